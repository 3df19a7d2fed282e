#!/usr/bin/env bash
# dev.sh - the two commands of the README, on a fresh Debian 12 machine (as root, or with sudo).
#
#   ./dev.sh run    set up everything, start the local JMAP stack, run the proxy on its embedded
#                   development default and print a working example request
#   ./dev.sh test   set up everything, start the local JMAP stack, run the whole test suite
#
# Setup is idempotent: Debian packages (once), a virtual environment in .venv with the project
# installed editable, the development certificates in certs-dev/, and the Cyrus JMAP stack behind
# nginx mTLS (tests/e2e/stack). Set NO_STACK=1 to skip the stack (unit and integration tests only).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
VENV=${VENV:-$HERE/.venv}
PY=$VENV/bin/python
export DEBIAN_FRONTEND=noninteractive

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "dev.sh: $*" >&2; exit 1; }

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "run as root (the JMAP stack installs Debian packages)"
    exec sudo -E "$0" "$@"
  fi
}

apt_install() {  # only what is missing
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing Debian packages: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup() {
  command -v apt-get >/dev/null || die "this script expects Debian (apt-get)"
  apt_install ca-certificates curl python3 python3-venv python3-dev gcc
  local base_py
  base_py=$(command -v python3)
  if [[ ! -x $PY ]]; then
    say "creating $VENV"
    "$base_py" -m venv "$VENV" || { apt_install python3-venv; "$base_py" -m venv "$VENV"; }
  fi
  if [[ ! -f $VENV/.installed ]] || [[ setup.cfg -nt $VENV/.installed ]]; then
    say "installing the project and its test tools into $VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e '.[dev]'
    touch "$VENV/.installed"
  fi
  "$PY" -m proxy.devcerts --dir "$HERE/certs-dev" >/dev/null
  # redis-server for the shared rate-limit tests (each test starts its own on a free port)
  apt_install redis-server
  if [[ ${NO_STACK:-0} != 1 ]]; then
    say "starting the JMAP stack (Cyrus behind nginx mTLS)"
    PYTHON="$PY" CERTS_DIR="$HERE/certs-dev" bash tests/e2e/stack/setup.sh >/tmp/sge-stack-setup.log 2>&1 \
      || { cat /tmp/sge-stack-setup.log >&2; die "the JMAP stack did not start (log above)"; }
    bash tests/e2e/stack/status.sh >/dev/null || die "the JMAP stack is not answering"
    say "starting the second JMAP stack instance (tenant routing tests: carol@globex.example)"
    CYRUS_BASE=/var/lib/sge-jmap-stack-b HTTP_PORT=28080 IMAP_PORT=28143 TLS_PORT=28443 SMTP_PORT=28025 \
      MUPDATE_PORT=28905 SIEVE_PORT=28190 CYRUS_USERS="carol@globex.example:carolpw" PYTHON="$PY" CERTS_DIR="$HERE/certs-dev" \
      bash tests/e2e/stack/setup.sh >/tmp/sge-stack-b-setup.log 2>&1 \
      || { cat /tmp/sge-stack-b-setup.log >&2; die "the second JMAP stack instance did not start (log above)"; }
    CYRUS_BASE=/var/lib/sge-jmap-stack-b TLS_PORT=28443 bash tests/e2e/stack/status.sh >/dev/null \
      || die "the second JMAP stack instance is not answering"
  fi
}

cmd=${1:-}
shift || true
case $cmd in
  run)
    need_root run "$@"
    setup
    say "starting sge-mail-proxy on its development default (Ctrl-C stops it)"
    exec "$VENV/bin/sge-mail-proxy" run --dev "$@"
    ;;
  test)
    need_root test "$@"
    setup
    say "running the tests"
    if [[ ${NO_STACK:-0} == 1 ]]; then
      exec "$VENV/bin/pytest" -q -m "not e2e" "$@"
    fi
    SGE_E2E_REQUIRED=1 exec "$VENV/bin/pytest" -q "$@"
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
