#!/usr/bin/env bash
# status.sh - exit 0 when the stack setup.sh started is up: its nginx, Cyrus
# master and SMTP sink pids are alive, and https://127.0.0.1:$TLS_PORT/jmap/
# answers through mTLS with the development client cert (Cyrus's 401 for a
# request without credentials; a 400 would be nginx refusing the cert).
# Else exit 1, saying why.  Same environment as setup.sh (CYRUS_BASE,
# TLS_PORT, CERTS_DIR).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${CYRUS_BASE:-/var/lib/sge-jmap-stack}
TLS_PORT=${TLS_PORT:-18443}
CERTS_DIR=${CERTS_DIR:-$(cd "$HERE/../../.." && pwd)/certs-dev}

down() { echo "status: down: $*" >&2; exit 1; }

# pid alive (not a zombie) AND its command line mentions our BASE
alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(tr -dc '0-9' < "$1")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$BASE/"
}

alive "$BASE/run/master.pid" || down "cyrus master ($BASE/run/master.pid)"
alive "$BASE/run/nginx.pid" || down "nginx ($BASE/run/nginx.pid)"
alive "$BASE/run/smtp_sink.pid" || down "SMTP sink ($BASE/run/smtp_sink.pid)"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$BASE/pki/ca.crt" \
         --cert "$CERTS_DIR/client.crt" --key "$CERTS_DIR/client.key" \
         "https://127.0.0.1:$TLS_PORT/jmap/" || true)
[[ $code == 401 ]] || down "https://127.0.0.1:$TLS_PORT/jmap/ with $CERTS_DIR/client.crt answered HTTP $code, want 401"
echo "status: up ($BASE, mTLS on 127.0.0.1:$TLS_PORT)"
