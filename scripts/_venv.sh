# Sourced by scripts/demo, scripts/test and scripts/bench: make sure .venv exists
# and has the project installed with the requested extra, reinstalling only when
# the build's inputs (pyproject.toml, setup.py, the C sources) changed since the
# last install or a compiled module is missing.
#   ensure_venv [EXTRA]
ensure_venv() {
  local extra="${1:-}" spec="." stamp
  [ -n "$extra" ] && spec=".[$extra]"
  stamp=".venv/.installed${extra:+-$extra}"
  if [ ! -x .venv/bin/python ]; then
    local py="${PYTHON:-}"
    if [ -z "$py" ]; then
      for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
          py="$candidate"; break
        fi
      done
    fi
    if [ -z "$py" ]; then
      echo "bgpool needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
      exit 1
    fi
    echo "creating .venv with $py" >&2
    "$py" -m venv .venv
    rm -f .venv/.installed*
  fi
  local stale="" input
  for input in pyproject.toml setup.py bgpool/shm/*.c; do
    if [ "$input" -nt "$stamp" ]; then stale=1; fi
  done
  for input in bgpool/shm/*.c; do
    if ! compgen -G "${input%.c}.*.so" >/dev/null; then stale=1; fi
  done
  if [ ! -f "$stamp" ] || [ -n "$stale" ]; then
    echo "installing bgpool${extra:+ with the $extra extra} into .venv" >&2
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
           .venv/bin/python -m pip install --quiet -e "$spec"; } >.venv/install.log 2>&1; then
      cat .venv/install.log >&2
      echo "installing bgpool failed (log above, also in .venv/install.log)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}
