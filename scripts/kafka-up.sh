#!/usr/bin/env bash
# kafka-up.sh - start a throw-away single-node Kafka broker on 127.0.0.1 for tests (this project's copy:
# the tests and .ci/run use it; it started from the one in the shared development notes).
#
#   kafka-up.sh [start]        start one (or reuse the one already up), print KEY=VALUE lines, exit 0
#   kafka-up.sh stop [PID...]  stop the given broker(s), or the one recorded in the state dir
#   kafka-up.sh status         print the recorded broker if it is alive (exit 1 if none)
#   kafka-up.sh fetch          only fill the cache (jars or binary), start nothing
#
# Typical use:   eval "$(kafka-up.sh)"; ...; kafka-up.sh stop
#
# Engines (KAFKA_ENGINE):
#   tansu   (default) tansu (crates.io): a Kafka-protocol broker written in Rust, SQLite storage
#           in the run dir. Built once with `cargo install` (about 8.5 minutes cold on 2 cores).
#   apache  Apache Kafka 4.x, KRaft mode, broker+controller in one JVM, jars from Maven Central
#           through a pom.xml beside this script. Not usable here (no Maven Central); untested.
#   auto    apache when its jars are cached or Maven Central answers, else tansu.
#
# Environment (all optional):
#   KAFKA_VERSION   Apache Kafka version                (4.1.1)
#   TANSU_VERSION   tansu version                       (0.6.0)
#   KAFKA_HOME      cache dir for the Apache jars       ($HOME/.cache/kafka-<ver>)
#   TANSU_HOME      cache dir for the tansu binary      ($HOME/.cache/tansu-<ver>)
#   KAFKA_STATE_DIR run dirs and current.env            (${TMPDIR:-/tmp}/kafka-up)
#   KAFKA_PORT      plaintext port                      (a free port)
#   KAFKA_SASL      "" | plaintext | ssl                ("")  also open an authenticated endpoint,
#                   SCRAM-SHA-512, user KAFKA_SASL_USER / KAFKA_SASL_PASSWORD (test / test-secret).
#                   ssl = SASL_SSL with a fresh self-signed cert (tansu only; needs openssl, stunnel4)
#   KAFKA_HEAP_OPTS JVM heap for apache                 (-Xms128m -Xmx512m)
#   KAFKA_WAIT_S    seconds to wait for readiness       (120)
#   KAFKA_FRESH=1   never reuse a running broker
#   KAFKA_KEEP=1    keep the run dir on stop
#
# Output (stdout), also in $KAFKA_STATE_DIR/current.env (shell-sourceable):
#   KAFKA_ENGINE BOOTSTRAP KAFKA_PID KAFKA_PIDS KAFKA_RUN_DIR, and with KAFKA_SASL set:
#   SASL_BOOTSTRAP SASL_PROTOCOL SASL_MECHANISM SASL_USERNAME SASL_PASSWORD [SASL_CA_FILE]
# Everything listens on 127.0.0.1 only.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENGINE=${KAFKA_ENGINE:-tansu}
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
TANSU_VERSION=${TANSU_VERSION:-0.6.0}
STATE_DIR=${KAFKA_STATE_DIR:-${TMPDIR:-/tmp}/kafka-up}
SASL=${KAFKA_SASL:-}
[[ $SASL == 1 ]] && SASL=plaintext
SASL_USER=${KAFKA_SASL_USER:-test}
SASL_PASSWORD=${KAFKA_SASL_PASSWORD:-test-secret}
WAIT_S=${KAFKA_WAIT_S:-120}
HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}
JAVA=${JAVA:-java}
CURRENT=$STATE_DIR/current.env
RUN=""       # run dir of the broker being started

STARTED=()   # pids started by this invocation; killed again if start-up fails
log() { echo "kafka-up: $*" >&2; }
die() {
  log "$*"
  local p
  for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  exit 1
}

apache_home() { echo "${KAFKA_HOME:-$HOME/.cache/kafka-$KAFKA_VERSION}"; }
tansu_home() { echo "${TANSU_HOME:-$HOME/.cache/tansu-$TANSU_VERSION}"; }

# ---------------------------------------------------------------- helpers
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

alive() { # pid -> 0 if running (zombies count as gone)
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z ]]
}

is_ours() { # pid -> 0 if it is a process this script starts
  local cmd
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *kafka.Kafka* || $cmd == *tansu\ broker* || $cmd == stunnel*stunnel.conf* ]]
}

# Kafka-protocol readiness probe. mode=api: any ApiVersions answer; mode=meta: a Metadata (v4)
# answer listing at least one broker. Exit 0 when ready.
probe() { # host port mode
  python3 - "$@" <<'PY' 2>/dev/null
import socket, struct, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
def call(s, key, ver, corr, body):
    cid = b"kafka-up"
    msg = struct.pack(">hhih", key, ver, corr, len(cid)) + cid + body
    s.sendall(struct.pack(">i", len(msg)) + msg)
    return recvn(s, struct.unpack(">i", recvn(s, 4))[0])
s = socket.create_connection((host, port), timeout=3)
s.settimeout(3)
r = call(s, 18, 0, 1, b"")                      # ApiVersions v0
if struct.unpack(">i", r[:4])[0] != 1: sys.exit(1)
if mode == "api": sys.exit(0)
r = call(s, 3, 4, 2, struct.pack(">ib", -1, 0))  # Metadata v4, all topics, no auto-create
corr, throttle, nbrokers = struct.unpack(">iii", r[:12])
sys.exit(0 if corr == 2 and nbrokers >= 1 else 1)
PY
}

wait_ready() { # pid port mode logfile
  local pid=$1 port=$2 mode=$3 logf=$4 t0=$SECONDS
  while (( SECONDS - t0 < WAIT_S )); do
    alive "$pid" || { tail -n 40 "$logf" >&2 || true; die "broker (pid $pid) exited during start-up; log: $logf"; }
    probe 127.0.0.1 "$port" "$mode" && return 0
    sleep 0.2
  done
  tail -n 40 "$logf" >&2 || true
  die "broker on port $port not ready after ${WAIT_S}s; log: $logf"
}

stop_pid() { # pid
  local pid=$1
  alive "$pid" || return 0
  is_ours "$pid" || { log "pid $pid is not a process started by kafka-up; left alone"; return 1; }
  kill -TERM "$pid" 2>/dev/null || true
  local _; for _ in $(seq 1 100); do alive "$pid" || return 0; sleep 0.2; done
  log "pid $pid still alive after 20s; sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
}

# Serialise between parallel callers. The lock is fd 9: every long-lived process started under
# it gets 9>&- so that it does not hold the lock for its whole life.
with_lock() { # lockfile cmd...
  local lockf=$1; shift
  mkdir -p "$(dirname "$lockf")"
  if command -v flock >/dev/null; then
    ( flock 9; "$@" ) 9>"$lockf"
  else
    "$@"
  fi
}

write_env() { # run engine port pids... ; SASL_* taken from globals S_*
  local run=$1 engine=$2 port=$3; shift 3
  {
    echo "KAFKA_ENGINE=$engine"
    [[ $engine == apache ]] && echo "KAFKA_VERSION=$KAFKA_VERSION" || echo "TANSU_VERSION=$TANSU_VERSION"
    echo "BOOTSTRAP=127.0.0.1:$port"
    echo "KAFKA_PID=$1"
    echo "KAFKA_PIDS='$*'"
    echo "KAFKA_RUN_DIR=$run"
    if [[ -n ${S_PORT:-} ]]; then
      echo "SASL_BOOTSTRAP=127.0.0.1:$S_PORT"
      echo "SASL_PROTOCOL=$S_PROTO"
      echo "SASL_MECHANISM=SCRAM-SHA-512"
      echo "SASL_USERNAME=$SASL_USER"
      echo "SASL_PASSWORD=$SASL_PASSWORD"
      [[ -n ${S_CA:-} ]] && echo "SASL_CA_FILE=$S_CA"
    fi
  } >"$run/env"
  printf '%s\n' "$@" >"$run/pid"
}

# ---------------------------------------------------------------- apache engine
apache_fetch_unlocked() {
  local home; home=$(apache_home)
  [[ -f $home/libs/.complete ]] && return 0
  command -v mvn >/dev/null || { log "mvn not found (needed to fetch Apache Kafka jars)"; return 1; }
  mkdir -p "$home"
  cp "$HERE/pom.xml" "$home/pom.xml"
  rm -rf "$home/libs.tmp"
  log "fetching Apache Kafka $KAFKA_VERSION jars into $home/libs (Maven Central)"
  mvn -q -B -f "$home/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$home/libs.tmp" >&2 \
    || { rm -rf "$home/libs.tmp"; return 1; }
  rm -rf "$home/libs"; mv "$home/libs.tmp" "$home/libs"; touch "$home/libs/.complete"
}
apache_fetch() { with_lock "$(apache_home).lock" apache_fetch_unlocked; }

apache_start() {
  local home; home=$(apache_home)
  [[ $SASL == ssl ]] && die "KAFKA_SASL=ssl is implemented for the tansu engine only"
  apache_fetch || die "could not fetch Apache Kafka jars (is Maven Central reachable?)"
  "$JAVA" -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' || die "Apache Kafka 4 needs Java 17+ (set JAVA=...)"
  local run port cport cid
  run=$(mktemp -d "$STATE_DIR/apache.XXXXXX"); RUN=$run
  port=${KAFKA_PORT:-$(free_port)}
  cport=$(free_port)
  local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
  local advertised="PLAINTEXT://127.0.0.1:$port"
  local protomap="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [[ $SASL == plaintext ]]; then
    S_PORT=$(free_port); S_PROTO=SASL_PLAINTEXT
    listeners+=",SASL_PLAINTEXT://127.0.0.1:$S_PORT"
    advertised+=",SASL_PLAINTEXT://127.0.0.1:$S_PORT"
    protomap+=",SASL_PLAINTEXT:SASL_PLAINTEXT"
  fi
  cat >"$run/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protomap
inter.broker.listener.name=PLAINTEXT
log.dirs=$run/data
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.segment.bytes=16777216
EOF
  if [[ $SASL == plaintext ]]; then
    cat >>"$run/server.properties" <<'EOF'
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
  fi
  cat >"$run/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
EOF
  local jopts=(-Dlog4j2.configurationFile="$run/log4j2.properties" -Djava.net.preferIPv4Stack=true)
  cid=$(python3 -c 'import base64,os
while True:
    u=base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    if not u.startswith("-"): print(u); break')
  local fmt=(format -t "$cid" -c "$run/server.properties")
  [[ $SASL == plaintext ]] && fmt+=(--add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]")
  "$JAVA" "${jopts[@]}" -cp "$home/libs/*" kafka.tools.StorageTool "${fmt[@]}" >"$run/format.log" 2>&1 \
    || { cat "$run/format.log" >&2; die "storage format failed"; }
  # shellcheck disable=SC2086
  nohup "$JAVA" $HEAP_OPTS "${jopts[@]}" -cp "$home/libs/*" kafka.Kafka "$run/server.properties" \
    >"$run/broker.log" 2>&1 </dev/null 9>&- &
  local pid=$!
  STARTED+=("$pid")
  printf '%s\n' "$pid" >"$run/pid"
  wait_ready "$pid" "$port" meta "$run/broker.log"
  [[ -n ${S_PORT:-} ]] && wait_ready "$pid" "$S_PORT" api "$run/broker.log"
  write_env "$run" apache "$port" "$pid"
}

# ---------------------------------------------------------------- tansu engine
tansu_fetch_unlocked() {
  local home; home=$(tansu_home)
  [[ -x $home/bin/tansu && -f $home/.complete ]] && return 0
  command -v cargo >/dev/null || { log "cargo not found (needed to build tansu)"; return 1; }
  log "building tansu $TANSU_VERSION into $home (crates.io; about 10 minutes on 2 cores the first time)"
  # The default feature set has no storage engine at all. "libsql" gives sqlite://, whose offsets
  # are right; memory:// ("dynostore") mis-reports high watermarks and skips records when a fetch
  # starts inside a record batch (tansu 0.6.0).
  cargo install --quiet tansu --version "$TANSU_VERSION" --locked --features libsql --root "$home" >&2 \
    || return 1
  touch "$home/.complete"
}
tansu_fetch() { with_lock "$(tansu_home).lock" tansu_fetch_unlocked; }

tansu_launch() { # run name listen_port advertised_port dbfile [extra args...] -> echoes pid
  local run=$1 name=$2 port=$3 adv=$4 db=$5; shift 5
  # tansu reads CLUSTER_ID, LISTENER_URL, STORAGE_ENGINE, SCHEMA_REGISTRY, DATA_LAKE and
  # OTEL_EXPORTER_OTLP_ENDPOINT from the environment: pass ours, drop the optional ones.
  # sqlite:// paths are relative to the working directory, hence the cd.
  ( cd "$run" && exec env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT -u DATA_LAKE \
      RUST_LOG="${RUST_LOG:-warn}" "$(tansu_home)/bin/tansu" broker \
      --cluster-id kafka-up \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$adv" \
      --storage-engine "sqlite://$db" "$@" \
      >"$run/$name.log" 2>&1 </dev/null 9>&- ) &
  echo $!
}

tansu_start() {
  tansu_fetch || die "could not build tansu"
  local run port pid pids=()
  run=$(mktemp -d "$STATE_DIR/tansu.XXXXXX"); RUN=$run
  port=${KAFKA_PORT:-$(free_port)}
  pid=$(tansu_launch "$run" broker "$port" "$port" data.db)
  STARTED+=("$pid"); pids+=("$pid")
  printf '%s\n' "${pids[@]}" >"$run/pid"
  wait_ready "$pid" "$port" meta "$run/broker.log"
  if [[ -n $SASL ]]; then
    # The authenticated endpoint is a second broker with its own database (two brokers writing
    # one SQLite file fail with "database is locked"). An authenticated broker refuses to create
    # the first user, so create it with the same database opened unauthenticated first.
    local iport init adv spid
    iport=$(free_port)
    init=$(tansu_launch "$run" sasl-init "$iport" "$iport" sasl.db)
    STARTED+=("$init")
    wait_ready "$init" "$iport" meta "$run/sasl-init.log"
    "$(tansu_home)/bin/tansu" user create --broker "tcp://127.0.0.1:$iport" \
      --mechanism scram512 "$SASL_USER" "$SASL_PASSWORD" >"$run/user.log" 2>&1 \
      || { cat "$run/user.log" >&2; die "could not create SCRAM user"; }
    stop_pid "$init"
    if [[ $SASL == ssl ]]; then
      command -v stunnel >/dev/null || die "KAFKA_SASL=ssl needs stunnel (apt-get install stunnel4)"
      S_PORT=$(free_port); S_PROTO=SASL_SSL; S_CA=$run/cert.pem; adv=$S_PORT
      openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=127.0.0.1 \
        -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
        -keyout "$run/key.pem" -out "$run/cert.pem" >/dev/null 2>&1 || die "openssl could not make a certificate"
    else
      S_PORT=$iport; S_PROTO=SASL_PLAINTEXT; adv=$iport
    fi
    spid=$(tansu_launch "$run" sasl-broker "$iport" "$adv" sasl.db --authentication)
    STARTED+=("$spid"); pids+=("$spid")
    printf '%s\n' "${pids[@]}" >"$run/pid"
    wait_ready "$spid" "$iport" api "$run/sasl-broker.log"
    if [[ $SASL == ssl ]]; then
      # TLS in front of the SASL broker, which advertises the TLS port. (tansu 0.6.0's own
      # --cert/--key cannot be used: its CLI rejects the two flags together.)
      cat >"$run/stunnel.conf" <<EOF
foreground = yes
pid =
debug = warning
[kafka-sasl-ssl]
accept = 127.0.0.1:$S_PORT
connect = 127.0.0.1:$iport
cert = $run/cert.pem
key = $run/key.pem
EOF
      stunnel "$run/stunnel.conf" >"$run/stunnel.log" 2>&1 </dev/null 9>&- &
      local tpid=$!
      STARTED+=("$tpid"); pids+=("$tpid")
      printf '%s\n' "${pids[@]}" >"$run/pid"
      local _; for _ in $(seq 1 50); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$S_PORT),1)" 2>/dev/null && break
        alive "$tpid" || die "stunnel exited: $(cat "$run/stunnel.log")"
        sleep 0.1
      done
    fi
  fi
  write_env "$run" tansu "$port" "${pids[@]}"
}

# ---------------------------------------------------------------- commands
pick_engine() {
  case $ENGINE in
    apache|tansu) echo "$ENGINE" ;;
    auto)
      if [[ -f $(apache_home)/libs/.complete ]] || apache_fetch 2>/dev/null; then echo apache
      else log "Apache Kafka jars not cached and Maven Central not reachable: using tansu"; echo tansu; fi ;;
    *) die "KAFKA_ENGINE must be apache, tansu or auto" ;;
  esac
}

current_alive() { # 0 if current.env names live processes and the broker answers
  [[ -f $CURRENT ]] || return 1
  local KAFKA_PIDS="" BOOTSTRAP="" p
  # shellcheck disable=SC1090
  . "$CURRENT"
  [[ -n $KAFKA_PIDS ]] || return 1
  for p in $KAFKA_PIDS; do alive "$p" && is_ours "$p" || return 1; done
  probe "${BOOTSTRAP%:*}" "${BOOTSTRAP##*:}" meta
}

cmd_start_unlocked() {
  if [[ ${KAFKA_FRESH:-0} != 1 ]] && current_alive; then
    log "reusing running broker ($CURRENT)"
    cat "$CURRENT"; return 0
  fi
  local engine t0=$SECONDS
  engine=$(pick_engine)
  "${engine}_start"
  cp "$RUN/env" "$CURRENT"
  log "$engine broker ready in $((SECONDS - t0))s"
  cat "$CURRENT"
}
cmd_start() { # one start at a time per state dir: a second caller waits, then reuses
  mkdir -p "$STATE_DIR"
  with_lock "$STATE_DIR/start.lock" cmd_start_unlocked
}

cmd_stop() {
  local want=("$@") pids=() d p q
  if [[ ${#want[@]} -eq 0 ]]; then
    [[ -f $CURRENT ]] || { log "nothing recorded in $CURRENT"; return 0; }
    local KAFKA_PIDS=""
    # shellcheck disable=SC1090
    . "$CURRENT"
    read -r -a want <<<"$KAFKA_PIDS"
  fi
  # a pid named on the command line stops every process of its run dir
  for p in "${want[@]}"; do
    pids+=("$p")
    for d in "$STATE_DIR"/apache.* "$STATE_DIR"/tansu.*; do
      [[ -f $d/pid ]] && grep -qx "$p" "$d/pid" && while read -r q; do pids+=("$q"); done <"$d/pid"
    done
  done
  local rc=0
  for p in $(printf '%s\n' "${pids[@]}" | sort -u); do stop_pid "$p" || rc=1; done
  # drop run dirs (and current.env) whose processes are all gone
  local live
  for d in "$STATE_DIR"/apache.* "$STATE_DIR"/tansu.*; do
    [[ -f $d/pid ]] || continue
    live=0; while read -r q; do [[ -n $q ]] && alive "$q" && live=1; done <"$d/pid"
    if (( live == 0 )); then
      [[ -f $CURRENT ]] && grep -qx "KAFKA_RUN_DIR=$d" "$CURRENT" && rm -f "$CURRENT"
      [[ ${KAFKA_KEEP:-0} == 1 ]] || rm -rf "$d"
    fi
  done
  return $rc
}

case ${1:-start} in
  start) cmd_start ;;
  stop) shift; cmd_stop "$@" ;;
  status) if current_alive; then cat "$CURRENT"; else log "no running broker recorded"; exit 1; fi ;;
  fetch) case $ENGINE in apache) apache_fetch ;; tansu) tansu_fetch ;; *) apache_fetch || tansu_fetch ;; esac ;;
  -h|--help|help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0" ;;
  *) die "unknown command: $1 (start|stop|status|fetch)" ;;
esac
