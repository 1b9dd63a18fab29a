# Sourced by scripts/demo and scripts/test: install the Debian packages a script
# needs when they are missing, with apt-get (as root, or through sudo), and stop
# with the reason if that fails.
#   ensure_debian_packages WHY COMMAND=PACKAGE...
# PACKAGE is installed when COMMAND (a name on the PATH, or an absolute path) is
# not found; WHY says what they are for, in the messages.
ensure_debian_packages() {
  local why="$1" pair missing=() log sudo=""
  shift
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log="$(mktemp)"
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo -n"
  echo "== installing ${missing[*]} (Debian's packages, $why)" >&2
  if { command -v apt-get >/dev/null &&
       $sudo apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
     } >"$log" 2>&1; then
    missing=()
    for pair in "$@"; do
      command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
    done
  fi
  if [ ${#missing[@]} -ne 0 ]; then
    cat "$log" >&2
    echo "could not install ${missing[*]} with apt-get (log above):" \
         "install them, then run $0 again" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}
