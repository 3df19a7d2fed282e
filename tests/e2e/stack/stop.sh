#!/usr/bin/env bash
# stop.sh - stop exactly the processes setup.sh started, via their pid files
# (nginx, Cyrus master + its children, SMTP sink, syslog sink).  Never kills
# by name.  Data in $CYRUS_BASE is kept; pass --purge to delete it as well.
set -uo pipefail
BASE=${CYRUS_BASE:-/var/lib/sge-jmap-stack}
PURGE=0
[[ "${1:-}" == "--purge" ]] && PURGE=1

# pid from file, only if alive and its command line mentions $BASE
ourpid() {
  local f=$1 pid
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' < "$f")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$BASE/" || return 1
  echo "$pid"
}

wait_gone() {  # timeout_s pid...
  local t=$1; shift
  local i p alive
  for ((i = 0; i < t * 10; i++)); do
    alive=0
    # a zombie (state Z, waiting for pid 1 to reap it) counts as gone
    for p in "$@"; do
      [[ -r /proc/$p/stat ]] && [[ $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]] && alive=1
    done
    [[ $alive == 0 ]] && return 0
    sleep 0.1
  done
  return 1
}

stop_one() {  # name pidfile signal
  local name=$1 f=$2 sig=$3 pid kids
  if pid=$(ourpid "$f"); then
    # remember direct children (e.g. Cyrus services) to wait for them too
    # (read /proc directly: minimal Debian images have no procps/ps)
    kids=$(awk -v pp="$pid" '$4 == pp {printf "%s ", $1}' /proc/[0-9]*/stat 2>/dev/null)
    kill "-$sig" "$pid" 2>/dev/null
    if ! wait_gone 10 "$pid" $kids; then
      echo "stop.sh: $name (pid $pid) still alive after 10s, sending KILL" >&2
      kill -KILL "$pid" $kids 2>/dev/null
      wait_gone 5 "$pid" $kids
    fi
    echo "stopped $name (pid $pid${kids:+; children $kids})"
  else
    echo "$name not running"
  fi
  rm -f "$f"
}

T0=$(date +%s.%N)
stop_one nginx        "$BASE/run/nginx.pid"       QUIT
stop_one cyrus-master "$BASE/run/master.pid"      TERM
stop_one smtp-sink    "$BASE/run/smtp_sink.pid"   TERM
stop_one syslog-sink  "$BASE/run/syslog_sink.pid" TERM   # it removes /dev/log itself
awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "stop took %.2fs\n", b-a}'

if [[ $PURGE == 1 ]]; then
  case "$BASE" in
    /var/lib/*|/tmp/*) rm -rf -- "$BASE"; echo "removed $BASE" ;;
    *) echo "refusing to purge unexpected path $BASE" >&2 ;;
  esac
fi
