#!/usr/bin/env bash
# setup.sh - install (apt) + configure + start a throw-away Cyrus IMAP 3.6
# JMAP server (Debian 12 packages) with an nginx mTLS front, the real JMAP
# server behind sge-mail-proxy's end-to-end tests.  Idempotent: re-running
# leaves a running instance alone (only re-checks users/mailboxes/certs/nginx)
# and prints the same summary.
#
#   sudo ./setup.sh            # install if needed, configure, start
#   sudo ./setup.sh --check    # ... then run jmap_smoke.py direct + via mTLS
#   sudo ./status.sh           # exit 0 when it is up and answers through mTLS
#   sudo ./stop.sh             # stop exactly what this started (pid files)
#
# Environment overrides (defaults in brackets):
#   CYRUS_BASE [/var/lib/sge-jmap-stack]  all state, configs, logs, PKI copy
#   CERTS_DIR [<repo>/certs-dev]  development PKI (proxy/devcerts.py): made
#                     there when missing; ca.crt, server.crt and server.key
#                     are copied to $CYRUS_BASE/pki on every run (nginx is
#                     reloaded when they changed)
#   PYTHON [<repo>/.venv/bin/python if present, else /usr/bin/python3]
#                     a python with `cryptography`, to run proxy.devcerts
#   HTTP_PORT [18080] IMAP_PORT [18143] TLS_PORT [18443]
#   SMTP_PORT [18025] MUPDATE_PORT [18905] SIEVE_PORT [18190]   all bound to 127.0.0.1 only
#   AUTHORIZE_AS [1]  1 = run as Murder backend + local mupdate master so that
#                     admin Basic auth + "Authorize-As: user" works
#   WITH_NGINX [1]    start the nginx mTLS terminator on TLS_PORT
#   CYRUS_SYSLOG [auto]  auto: if the box has no /dev/log, run syslog_sink.py
#                     on /dev/log -> $CYRUS_BASE/log/syslog (Cyrus logs only
#                     via syslog); 0: never
#   CYRUS_USERS ["alice@example.com:alicepw bob@example.com:bobpw"]
#   CYRUS_ADMIN [admin] CYRUS_ADMINPW [adminpw]
#   HTTP_PREFORK [2] HTTP_MAXCHILD [50]
#   NO_INSTALL [0]    1 = never call apt-get (fail if something is missing)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
BASE=${CYRUS_BASE:-/var/lib/sge-jmap-stack}
CERTS_DIR=${CERTS_DIR:-$REPO/certs-dev}
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=/usr/bin/python3
  [[ -x $REPO/.venv/bin/python ]] && PYTHON=$REPO/.venv/bin/python
fi
HTTP_PORT=${HTTP_PORT:-18080}
IMAP_PORT=${IMAP_PORT:-18143}
TLS_PORT=${TLS_PORT:-18443}
SMTP_PORT=${SMTP_PORT:-18025}
MUPDATE_PORT=${MUPDATE_PORT:-18905}
SIEVE_PORT=${SIEVE_PORT:-18190}
AUTHORIZE_AS=${AUTHORIZE_AS:-1}
WITH_NGINX=${WITH_NGINX:-1}
CYRUS_SYSLOG=${CYRUS_SYSLOG:-auto}
CYRUS_USERS=${CYRUS_USERS:-"alice@example.com:alicepw bob@example.com:bobpw"}
ADMIN=${CYRUS_ADMIN:-admin}
ADMINPW=${CYRUS_ADMINPW:-adminpw}
SERVERNAME=localhost
HTTP_PREFORK=${HTTP_PREFORK:-2}
HTTP_MAXCHILD=${HTTP_MAXCHILD:-50}
NO_INSTALL=${NO_INSTALL:-0}
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

CYRBIN=/usr/lib/cyrus/bin
PY=/usr/bin/python3
export DEBIAN_FRONTEND=noninteractive

now() { date +%s.%N; }
T0=$(now)
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
log() { printf '[setup %6ss] %s\n' "$(elapsed "$T0")" "$*"; }
die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root"

# pid alive AND its command line mentions our BASE (guards against pid reuse)
ours_alive() {
  local pidf=$1 pid
  [[ -s $pidf ]] || return 1
  pid=$(tr -dc '0-9' < "$pidf")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$BASE/" || return 1
}

wait_tcp() {  # host port timeout_s
  local i end; end=$(awk -v t="$3" 'BEGIN{print t*10}')
  for ((i = 0; i < end; i++)); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- 1. install
PKGS=(cyrus-imapd cyrus-common cyrus-caldav cyrus-admin cyrus-clients sasl2-bin
      python3 python3-aiosmtpd python3-cryptography curl ca-certificates)
[[ $AUTHORIZE_AS == 1 ]] && PKGS+=(cyrus-murder)
[[ $WITH_NGINX == 1 ]] && PKGS+=(nginx)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
INSTALL_S=0
if ((${#missing[@]})); then
  [[ $NO_INSTALL == 1 ]] && die "missing packages: ${missing[*]}"
  log "installing: ${missing[*]}"
  Ti=$(now)
  # keep package postinst scripts from starting Debian's default cyrus
  # (ports 143/110/8008/4190), exim4 (:25) or nginx (:80) instances
  made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
    trap '[[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ $made_policy == 1 ]]; then rm -f /usr/sbin/policy-rc.d; made_policy=0; fi
  INSTALL_S=$(elapsed "$Ti")
  log "apt install took ${INSTALL_S}s"
else
  log "all packages already installed"
fi

Tc=$(now)
# ---------------------------------------------------------------- 2. layout
mkdir -p "$BASE"/{etc/jwt,lib,spool,sieve,search,log,pki,smtp-sink} \
         "$BASE"/run/{proc,lock,socket,mupdate-proc,mupdate-lock} \
         "$BASE"/nginx/tmp
for d in db proc socket log msg user quota lock sync; do mkdir -p "$BASE/lib/$d"; done
[[ $AUTHORIZE_AS == 1 ]] && for d in db proc socket log; do mkdir -p "$BASE/mupdate/$d"; done

render() {
  sed -e "s|@BASE@|$BASE|g" -e "s|@SERVERNAME@|$SERVERNAME|g" \
      -e "s|@ADMIN@|$ADMIN|g" -e "s|@ADMINPW@|$ADMINPW|g" \
      -e "s|@HTTP_PORT@|$HTTP_PORT|g" -e "s|@IMAP_PORT@|$IMAP_PORT|g" \
      -e "s|@TLS_PORT@|$TLS_PORT|g" -e "s|@SMTP_PORT@|$SMTP_PORT|g" \
      -e "s|@MUPDATE_PORT@|$MUPDATE_PORT|g" -e "s|@SIEVE_PORT@|$SIEVE_PORT|g" \
      -e "s|@HTTP_PREFORK@|$HTTP_PREFORK|g" -e "s|@HTTP_MAXCHILD@|$HTTP_MAXCHILD|g" "$1"
}

RUNNING=0
ours_alive "$BASE/run/master.pid" && RUNNING=1
# a stack started from other templates (a service added since, another port) is restarted
TEMPLATES_SHA=$(cat "$HERE"/conf/*.tmpl | sha256sum | cut -d' ' -f1)
if [[ $RUNNING == 1 && "$(cat "$BASE/run/templates.sha256" 2>/dev/null)" != "$TEMPLATES_SHA" ]]; then
  log "the running stack was started from other templates: restarting it"
  CYRUS_BASE=$BASE bash "$HERE/stop.sh" >/dev/null 2>&1 || true
  RUNNING=0
fi

# refuse to start on busy ports (else the readiness probe below could be
# answered by somebody else's server on the same port)
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ $RUNNING == 0 ]]; then
  for p in "$HTTP_PORT" "$IMAP_PORT" "$SIEVE_PORT" $( [[ $AUTHORIZE_AS == 1 ]] && echo "$MUPDATE_PORT" ); do
    port_busy "$p" && die "port 127.0.0.1:$p is already in use (set HTTP_PORT/IMAP_PORT/... to free ports)"
  done
fi
if ! ours_alive "$BASE/run/smtp_sink.pid"; then
  port_busy "$SMTP_PORT" && die "SMTP sink port 127.0.0.1:$SMTP_PORT is already in use"
fi
if [[ $WITH_NGINX == 1 ]] && ! ours_alive "$BASE/run/nginx.pid"; then
  port_busy "$TLS_PORT" && die "nginx port 127.0.0.1:$TLS_PORT is already in use"
fi


if [[ $RUNNING == 0 ]]; then
  # ------------------------------------------------------------ 3. configs
  {
    render "$HERE/conf/imapd.conf.tmpl"
    [[ $AUTHORIZE_AS == 1 ]] && render "$HERE/conf/imapd-murder.conf.tmpl"
  } > "$BASE/etc/imapd.conf"
  if [[ $AUTHORIZE_AS == 1 ]]; then
    render "$HERE/conf/cyrus.conf.tmpl" | sed -e 's/ #murder$//' > "$BASE/etc/cyrus.conf"
    render "$HERE/conf/mupdate.conf.tmpl" > "$BASE/etc/mupdate.conf"
  else
    render "$HERE/conf/cyrus.conf.tmpl" | sed -e '/ #murder$/d' > "$BASE/etc/cyrus.conf"
  fi
  render "$HERE/conf/nginx.conf.tmpl" > "$BASE/etc/nginx.conf"

  # JWT (HS256) key for Bearer auth: raw key in etc/jwt.key (for the proxy /
  # tests), PEM-ish "HMAC KEY" block in etc/jwt/ (read by Cyrus httpd)
  if [[ ! -s $BASE/etc/jwt.key ]]; then
    head -c 32 /dev/urandom > "$BASE/etc/jwt.key"
    { echo "-----BEGIN HMAC KEY-----"; base64 -w0 "$BASE/etc/jwt.key"; echo
      echo "-----END HMAC KEY-----"; } > "$BASE/etc/jwt/hs256.pem"
  fi

  # SASL users in our own sasldb (not /etc/sasldb2).  Users with @domain
  # keep their domain as SASL realm; the admin (no domain) must live in the
  # realm = servername, which is what Cyrus passes as default realm.
  echo -n "$ADMINPW" | saslpasswd2 -p -c -f "$BASE/etc/sasldb2" -u "$SERVERNAME" "$ADMIN" 2>/dev/null
  for up in $CYRUS_USERS; do
    echo -n "${up#*:}" | saslpasswd2 -p -c -f "$BASE/etc/sasldb2" "${up%%:*}" 2>/dev/null
  done

  chown -R cyrus:mail "$BASE"/{etc,lib,spool,sieve,search,run,log}
  [[ -d $BASE/mupdate ]] && chown -R cyrus:mail "$BASE/mupdate"
  chown cyrus:mail "$BASE"; chmod 755 "$BASE"
  chmod 640 "$BASE/etc/sasldb2"; chmod 600 "$BASE/etc/jwt/hs256.pem"
  chmod 644 "$BASE/etc/jwt.key"   # test-only: readable by test runners

  # ------------------------------------------------------------ 4. syslog
  if [[ $CYRUS_SYSLOG != 0 ]]; then
    if [[ -S /dev/log ]] && ! ours_alive "$BASE/run/syslog_sink.pid" && [[ -s $BASE/run/syslog_sink.pid ]]; then
      rm -f /dev/log   # stale socket left by our own killed sink
    fi
    if [[ ! -e /dev/log ]]; then
      setsid "$PY" "$HERE/syslog_sink.py" /dev/log "$BASE/log/syslog" </dev/null >/dev/null 2>&1 &
      echo $! > "$BASE/run/syslog_sink.pid"
      for _ in $(seq 50); do [[ -S /dev/log ]] && break; sleep 0.05; done
      log "syslog sink on /dev/log -> $BASE/log/syslog"
    elif ours_alive "$BASE/run/syslog_sink.pid"; then
      log "syslog sink already running"
    else
      log "/dev/log exists (system syslog, or another instance's sink): Cyrus logs go there, not to $BASE/log/syslog"
    fi
  fi
fi

# ---------------------------------------------------------------- 5. SMTP sink
if ! ours_alive "$BASE/run/smtp_sink.pid"; then
  setsid "$PY" "$HERE/smtp_sink.py" 127.0.0.1 "$SMTP_PORT" "$BASE/smtp-sink" \
    </dev/null >"$BASE/log/smtp_sink.log" 2>&1 &
  echo $! > "$BASE/run/smtp_sink.pid"
fi

# ---------------------------------------------------------------- 6. cyrus
if [[ $RUNNING == 0 ]]; then
  Tm=$(now)
  echo "$TEMPLATES_SHA" > "$BASE/run/templates.sha256"
  "$CYRBIN/master" -C "$BASE/etc/imapd.conf" -M "$BASE/etc/cyrus.conf" \
      -p "$BASE/run/master.pid" -d -L "$BASE/log/master.err" \
      || die "master failed to start: $(tail -5 "$BASE/log/master.err")"
  # master -d returns once its pidfile is locked; listeners/preforks come a
  # bit later -> wait for the real thing (HTTP 401 on /jmap/ without auth)
  ready=0
  for _ in $(seq 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$HTTP_PORT/jmap/" || true)
    [[ $code == 401 ]] && { ready=1; break; }
    ours_alive "$BASE/run/master.pid" || die "cyrus master died during start-up (port busy?): $(tail -3 "$BASE/log/master.err" 2>/dev/null; grep -E 'master\[' "$BASE/log/syslog" 2>/dev/null | tail -3)"
    sleep 0.05
  done
  [[ $ready == 1 ]] || die "Cyrus httpd not ready on :$HTTP_PORT (see $BASE/log/syslog, $BASE/log/master.err)"
  wait_tcp 127.0.0.1 "$IMAP_PORT" 15 || die "Cyrus imapd not listening on :$IMAP_PORT"
  wait_tcp 127.0.0.1 "$SIEVE_PORT" 15 || die "Cyrus timsieved not listening on :$SIEVE_PORT"
  CYRUS_READY_S=$(elapsed "$Tm")
  log "cyrus master up, httpd answering after ${CYRUS_READY_S}s"
  if [[ $AUTHORIZE_AS == 1 ]]; then
    wait_tcp 127.0.0.1 "$MUPDATE_PORT" 15 || die "mupdate not listening on :$MUPDATE_PORT"
    # push existing local mailboxes to the (local) mupdate master
    su -s /bin/sh cyrus -c "$CYRBIN/ctl_mboxlist -C $BASE/etc/imapd.conf -m" >/dev/null 2>&1 \
      || die "ctl_mboxlist -m failed (mupdate auth?)"
  fi
else
  log "cyrus already running (pid $(cat "$BASE/run/master.pid")); run stop.sh first to apply config changes"
fi

# ---------------------------------------------------------------- 7. mailboxes
"$PY" "$HERE/provision.py" 127.0.0.1 "$IMAP_PORT" "$ADMIN" "$ADMINPW" $CYRUS_USERS \
  | sed 's/^/  provision: /' | grep -v 'exists with' || true
log "users/mailboxes provisioned"

# ---------------------------------------------------------------- 8. PKI
# The development PKI lives in $CERTS_DIR (proxy/devcerts.py makes it); nginx
# uses a copy in $BASE/pki, refreshed on every run so regenerated certs count.
PKI=$BASE/pki
for f in ca.crt server.crt server.key client.crt client.key rogue-client.crt rogue-client.key; do
  if [[ ! -s $CERTS_DIR/$f ]]; then
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m proxy.devcerts --dir "$CERTS_DIR" \
      | sed 's/^/  dev-certs: /' || die "proxy.devcerts failed (PYTHON=$PYTHON needs the cryptography package)"
    break
  fi
done
PKI_CHANGED=0
for f in ca.crt:644 server.crt:644 server.key:600; do
  if ! cmp -s "$CERTS_DIR/${f%%:*}" "$PKI/${f%%:*}"; then
    install -m "${f#*:}" "$CERTS_DIR/${f%%:*}" "$PKI/${f%%:*}"
    PKI_CHANGED=1
  fi
done
[[ $PKI_CHANGED == 1 ]] && log "PKI copied from $CERTS_DIR to $PKI"

# ---------------------------------------------------------------- 9. nginx
if [[ $WITH_NGINX == 1 ]]; then
  if ! ours_alive "$BASE/run/nginx.pid"; then
    [[ $RUNNING == 1 ]] && render "$HERE/conf/nginx.conf.tmpl" > "$BASE/etc/nginx.conf"
    nginx -t -q -p "$BASE/nginx" -c "$BASE/etc/nginx.conf" -e "$BASE/log/nginx-error.log" \
      || die "nginx config test failed"
    nginx -p "$BASE/nginx" -c "$BASE/etc/nginx.conf" -e "$BASE/log/nginx-error.log"
    wait_tcp 127.0.0.1 "$TLS_PORT" 10 || die "nginx not listening on :$TLS_PORT"
    log "nginx mTLS front up"
  elif [[ $PKI_CHANGED == 1 ]]; then
    # reload so the new certs are served; wait for the old workers to leave
    npid=$(tr -dc '0-9' < "$BASE/run/nginx.pid")
    old=$(awk -v pp="$npid" '$4 == pp {printf "%s ", $1}' /proc/[0-9]*/stat 2>/dev/null)
    nginx -t -q -p "$BASE/nginx" -c "$BASE/etc/nginx.conf" -e "$BASE/log/nginx-error.log" \
      || die "nginx config test failed"
    nginx -s reload -p "$BASE/nginx" -c "$BASE/etc/nginx.conf" -e "$BASE/log/nginx-error.log"
    for _ in $(seq 100); do
      gone=1
      for p in $old; do [[ -e /proc/$p ]] && gone=0; done
      [[ $gone == 1 ]] && break
      sleep 0.1
    done
    [[ $gone == 1 ]] || die "nginx workers $old did not leave after reload"
    log "nginx reloaded with the new certificates"
  else
    log "nginx already running"
  fi
fi
CONFIG_START_S=$(elapsed "$Tc")

cat <<EOF

==== Cyrus JMAP test server ready (config+start ${CONFIG_START_S}s, apt ${INSTALL_S}s, total $(elapsed "$T0")s)
  JMAP (plain HTTP, Cyrus httpd) : http://127.0.0.1:$HTTP_PORT/jmap/   (session: /.well-known/jmap -> 301 /jmap)
  JMAP via nginx mTLS (TLS 1.3)  : https://127.0.0.1:$TLS_PORT/jmap/
  IMAP (plaintext LOGIN ok)      : 127.0.0.1:$IMAP_PORT
  ManageSieve (timsieved)        : 127.0.0.1:$SIEVE_PORT
  SMTP sink (EmailSubmission)    : 127.0.0.1:$SMTP_PORT -> $BASE/smtp-sink/NNNNNN.{eml,json}
$( [[ $AUTHORIZE_AS == 1 ]] && echo "  mupdate master (Murder)       : 127.0.0.1:$MUPDATE_PORT   (Authorize-As enabled for $ADMIN)" )
  users  : $CYRUS_USERS   admin: $ADMIN:$ADMINPW
  certs  : CA $CERTS_DIR/ca.crt  client $CERTS_DIR/client.{crt,key}  untrusted $CERTS_DIR/rogue-client.{crt,key}
  JWT    : HS256 key $BASE/etc/jwt.key  (Authorization: Bearer <jwt {"sub":user,"iat":now}>)
  logs   : $BASE/log/{syslog,master.err,nginx-error.log,nginx-access.log,smtp_sink.log}
  status : $HERE/status.sh      stop: $HERE/stop.sh
EOF

if [[ $CHECK == 1 ]]; then
  u1=${CYRUS_USERS%% *}
  echo; echo "==== smoke test, direct"
  "$PY" "$HERE/jmap_smoke.py" --quiet --base "http://127.0.0.1:$HTTP_PORT" \
     --user "${u1%%:*}" --password "${u1#*:}" --smtp-dir "$BASE/smtp-sink" \
     --admin "$ADMIN" --admin-password "$ADMINPW" --jwt-key "$BASE/etc/jwt.key" \
     $( [[ $AUTHORIZE_AS == 1 ]] && echo --authorize-as ) || die "smoke test (direct) failed"
  if [[ $WITH_NGINX == 1 ]]; then
    echo; echo "==== smoke test, through nginx mTLS (client cert $CERTS_DIR/client.crt)"
    "$PY" "$HERE/jmap_smoke.py" --quiet --base "https://127.0.0.1:$TLS_PORT" \
       --cacert "$PKI/ca.crt" --cert "$CERTS_DIR/client.crt" --key "$CERTS_DIR/client.key" \
       --user "${u1%%:*}" --password "${u1#*:}" --smtp-dir "$BASE/smtp-sink" \
       --admin "$ADMIN" --admin-password "$ADMINPW" --jwt-key "$BASE/etc/jwt.key" \
       $( [[ $AUTHORIZE_AS == 1 ]] && echo --authorize-as ) || die "smoke test (mTLS) failed"
    echo; echo "==== mTLS checks"
    bad=0
    expect() {  # want what curl-args...
      local want=$1 what=$2 c; shift 2
      c=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$PKI/ca.crt" -u "${u1%%:*}:${u1#*:}" "$@" \
            "https://127.0.0.1:$TLS_PORT/jmap/" || true)
      if [[ $c == "$want" ]]; then echo "PASS $what -> HTTP $c"; else echo "FAIL $what -> HTTP $c, want $want"; bad=1; fi
    }
    expect 400 "no client cert (nginx: 'No required SSL certificate was sent')"
    expect 400 "client cert from the untrusted CA" --cert "$CERTS_DIR/rogue-client.crt" --key "$CERTS_DIR/rogue-client.key"
    expect 000 "TLS 1.2 at most (handshake refused)" --tls-max 1.2 --cert "$CERTS_DIR/client.crt" --key "$CERTS_DIR/client.key"
    expect 200 "trusted client cert" --cert "$CERTS_DIR/client.crt" --key "$CERTS_DIR/client.key"
    [[ $bad == 0 ]] || die "mTLS checks failed"
  fi
fi
