# Shared settings for the deploy scripts. Sourced, not run.
# OMRS_STATE holds every service's data, config and logs (one folder per service).
OMRS_STATE="${OMRS_STATE:-/var/lib/omrs-stream}"
OMRS_LOGS="${OMRS_LOGS:-$OMRS_STATE/logs}"
mkdir -p "$OMRS_STATE" "$OMRS_LOGS"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or the deadline passes.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then return 1; fi
    sleep 0.5
  done
  log "$what is ready"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid PIDFILE NAME: SIGTERM, wait up to 60 s, then SIGKILL.
stop_pid() {
  local pidfile=$1 name=$2
  if ! pid_alive "$pidfile"; then log "$name is not running"; rm -f "$pidfile"; return 0; fi
  local pid; pid=$(cat "$pidfile")
  kill "$pid"
  local deadline=$(( $(date +%s) + 60 ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then log "$name did not stop in 60 s, killing"; kill -9 "$pid"; break; fi
    sleep 0.3
  done
  rm -f "$pidfile"
  log "$name stopped"
}

# one_at_a_time NAME: serialise concurrent runs of a start/stop script (two `dev-up`s at once
# must not both start the same server). Holds the lock until the script exits.
one_at_a_time() {
  exec 9>"$OMRS_STATE/.$1.lock"
  flock 9
}

# The Kafka jar directory of deploy/kafka/pom.xml: one per pom, so a changed pom resolves its
# jars afresh (kafka-up fills it; kafka-security uses it).
kafka_jars() {
  local pom="$1" version
  version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")
  echo "$OMRS_STATE/kafka/jars-$version-$(sha256sum "$pom" | cut -c1-12)"
}

# debian_prometheus: the directory Debian's prometheus package is unpacked into (bin and
# promtool under usr/bin), downloading it the first time. Not installed: no service, no user.
debian_prometheus() {
  local dir=/var/cache/omrs-stream/prometheus-deb tmp
  if [ ! -x "$dir/usr/bin/prometheus" ] || [ ! -x "$dir/usr/bin/promtool" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get download prometheus >/dev/null; }; }) \
      || { rm -rf "$tmp"; die "could not download Debian's prometheus package"; }
    mkdir -p "$dir"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
    rm -rf "$tmp"
  fi
  echo "$dir"
}
