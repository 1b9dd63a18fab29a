# Sourced by scripts/demo, scripts/test and scripts/bench: make sure a virtual
# environment exists and has the project installed with the requested extra,
# reinstalling only when the build's inputs (pyproject.toml, setup.py, the C
# sources, this file) changed since the last install or a compiled module is
# missing, and byte-compiles the package. The editable install is setuptools'
# "compat" mode, a plain path in a .pth file: its default mode's import finder
# loads pathlib, re and urllib in every interpreter's `site`, 12 ms of each
# supervisor's start that an install from a wheel does not pay.
#   ensure_venv [EXTRA [PYTHON_VERSION]]
# Without a version: .venv, with $PYTHON or the first of python3.11, 3.12, 3.13,
# python3 found. With one (e.g. 3.13): .venv-3.13, with that interpreter from
# the PATH or from pyenv's versions. Sets VENV to the environment's directory.

# The interpreter for Python VERSION (X.Y), or nothing.
find_python() {
  local version="$1" candidate
  for candidate in "python$version" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version"*/bin/"python$version"; do
    if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))" >/dev/null 2>&1; then
      command -v "$candidate" || echo "$candidate"
      return
    fi
  done
}

ensure_venv() {
  local extra="${1:-}" version="${2:-}" spec="." stamp py=""
  [ -n "$extra" ] && spec=".[$extra]"
  VENV=".venv${version:+-$version}"
  stamp="$VENV/.installed${extra:+-$extra}"
  if [ ! -x "$VENV/bin/python" ]; then
    if [ -n "$version" ]; then
      py="$(find_python "$version")"
      if [ -z "$py" ]; then
        echo "Python $version was not found (on the PATH, or in pyenv's versions)" >&2
        exit 1
      fi
    else
      py="${PYTHON:-}"
      if [ -z "$py" ]; then
        for candidate in 3.11 3.12 3.13; do
          py="$(find_python "$candidate")"
          [ -n "$py" ] && break
        done
      fi
      if [ -z "$py" ] && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py=python3
      fi
      if [ -z "$py" ]; then
        echo "bgpool needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
        exit 1
      fi
    fi
    echo "creating $VENV with $py" >&2
    "$py" -m venv "$VENV"
    rm -f "$VENV"/.installed*
  fi
  local stale="" input tag
  tag="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  for input in pyproject.toml setup.py scripts/_venv.sh bgpool/*.c bgpool/shm/*.c; do
    if [ "$input" -nt "$stamp" ]; then stale=1; fi
  done
  for input in bgpool/*.c bgpool/shm/*.c; do
    if [ ! -f "${input%.c}$tag" ]; then stale=1; fi
  done
  if [ ! -f "$stamp" ] || [ -n "$stale" ]; then
    echo "installing bgpool${extra:+ with the $extra extra} into $VENV" >&2
    if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip &&
           "$VENV/bin/python" -m pip install --quiet -e "$spec" --config-settings editable_mode=compat; } >"$VENV/install.log" 2>&1; then
      cat "$VENV/install.log" >&2
      echo "installing bgpool failed (log above, also in $VENV/install.log)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
  # Byte-compile bgpool's modules, as an install from a wheel does: from an
  # editable install under PYTHONDONTWRITEBYTECODE=1 (set in this machine's
  # environment), every supervisor would otherwise compile its own modules as
  # it starts (about 50 ms of its start-up). Up-to-date modules are skipped.
  "$VENV/bin/python" -m compileall -q bgpool >/dev/null
}
