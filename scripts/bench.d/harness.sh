# Sourced by scripts/bench: what every scenario needs. Servers are started here and
# stopped when scripts/bench exits; nothing is left running.
#
#   work                    a temporary directory, removed at exit
#   track PID               stop PID at exit
#   free_port, wait_http URL
#   build TARGETS...        cargo build --release of fanout and the named examples
#   need_redis              $redis_url answers, or fail saying how to get it
#   need_postgres           $db_admin is ready, or fail
#   need_kafka              $kafka: FANOUT_TEST_KAFKA, else a private Apache Kafka
#                           (scripts/servers/kafka; jars fetched with Maven the first time)
#   new_topic NAME PARTS    creates a topic on the private broker (kafka-topics); on an
#                           external one too when the scenario set create_topics=always
#   private_redis [ARGS]    a redis-server of this run only; sets $private_redis_port
#   need_peer               ../shared/peers/socketio with its node_modules
#   rss_kib PID, cpu_ms PID VmRSS, and utime+stime in ms, from /proc
#   wait_files TRIES FILE...  until every FILE is non-empty, TRIES × 0.1 s at most
#   result SCENARIO SIDE RUN JSON...
#                           one results row in $row, appended to $work/SCENARIO.jsonl and
#                           $BENCH_RESULTS/SCENARIO.jsonl (when set)
#   start_fanout DIR ...    a release fanout node; sets $node_pid, $node_public, $node_admin
#   start_peer DIR ...      a socket.io peer instance; sets $node_pid, $node_public

work=$(mktemp -d)
pids=()
cleanup_hooks=()
cleanup() {
  local p h
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for h in "${cleanup_hooks[@]}"; do eval "$h" || true; done
  if [ -n "${BENCH_KEEP:-}" ]; then echo "work directory kept (BENCH_KEEP): $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

track() { pids+=("$1"); }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "timeout waiting for $1" >&2; return 1; }

bin=${BENCH_FANOUT_BIN:-$PWD/target/release/fanout}  # another build to compare: BENCH_FANOUT_BIN
examples=$PWD/target/release/examples
bench_d=$PWD/scripts/bench.d

build() {
  local args=() e
  for e in "$@"; do args+=(--example "$e"); done
  echo "==> building (release)"
  cargo build --release --quiet --bin fanout "${args[@]}"
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

redis_url=${FANOUT_TEST_REDIS:-redis://127.0.0.1:6379}
db_admin=${FANOUT_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}

need_redis() {
  redis-cli -u "$redis_url" ping >/dev/null 2>&1 \
    || { echo "Redis at $redis_url is not answering (run ./scripts/test once to set it up)" >&2; exit 1; }
}

need_postgres() {
  pg_isready -d "$db_admin" >/dev/null 2>&1 \
    || { echo "PostgreSQL at $db_admin is not ready (run ./scripts/test once to set it up)" >&2; exit 1; }
}

# A fresh database for this run, dropped at exit; prints its URL.
new_database() {
  local db=fanout_bench_$RANDOM$RANDOM
  psql "$db_admin" -qc "CREATE DATABASE $db" >/dev/null
  cleanup_hooks+=("psql '$db_admin' -qc 'DROP DATABASE IF EXISTS $db WITH (FORCE)' >/dev/null 2>&1")
  echo "${db_admin%/*}/$db"
}

kafka=${FANOUT_TEST_KAFKA:-}
private_kafka=0
servers_d=$PWD/scripts/servers
need_kafka() {
  [ -n "$kafka" ] && return 0
  command -v java >/dev/null \
    || { echo "java not found: the private Apache Kafka needs Java 17+ (apt-get install default-jre-headless), or set FANOUT_TEST_KAFKA=host:port" >&2; exit 1; }
  cleanup_hooks+=("'$servers_d/kafka' stop '$work/kafka' >/dev/null 2>&1")
  "$servers_d/kafka" start "$work/kafka" \
    || { echo "could not start Apache Kafka (reason above), or set FANOUT_TEST_KAFKA=host:port" >&2; exit 1; }
  # shellcheck source=/dev/null  # written by scripts/servers/kafka start
  kafka=$(. "$work/kafka/env" && echo "$FANOUT_TEST_KAFKA") private_kafka=1
}

# new_topic NAME PARTITIONS: on the private broker. An external broker auto-creates topics
# with its own num.partitions, unless the scenario set create_topics=always (it needs that
# many partitions): then through the Kafka tools cached by scripts/servers/kafka.
create_topics=private
new_topic() {
  [ "$private_kafka" = 1 ] || [ "$create_topics" = always ] || return 0
  "$servers_d/kafka" run org.apache.kafka.tools.TopicCommand --bootstrap-server "$kafka" \
    --create --topic "$1" --partitions "$2" --replication-factor 1 >/dev/null
}

# private_redis [redis-server ARGS...]: a redis-server on a free port for this run only, no
# persistence, so that nothing but the run moves its figures; stopped at exit. Sets
# $private_redis_port; its log is $work/redis-<port>.log.
private_redis() {
  command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 1; }
  private_redis_port=$(free_port)
  local log=$work/redis-$private_redis_port.log
  redis-server --port "$private_redis_port" --bind 127.0.0.1 --save '' --appendonly no "$@" >"$log" 2>&1 &
  track $!
  for _ in $(seq 1 50); do redis-cli -p "$private_redis_port" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "the private redis-server did not start:" >&2
  cat "$log" >&2
  exit 1
}

peer_dir=$(cd ../shared/peers/socketio 2>/dev/null && pwd || true)
need_peer() {
  [ -n "$peer_dir" ] || { echo "../shared/peers/socketio is missing" >&2; exit 1; }
  [ -d "$peer_dir/node_modules" ] || npm install --prefix "$peer_dir" --no-audit --no-fund --loglevel=error
}

# wait_files TRIES FILE...: true once every FILE is non-empty, false after TRIES × 0.1 s.
wait_files() {
  local tries=$1 f all
  shift
  for _ in $(seq 1 "$tries"); do
    all=1
    for f in "$@"; do [ -s "$f" ] || { all=0; break; }; done
    [ $all = 1 ] && return 0
    sleep 0.1
  done
  return 1
}

# result SCENARIO SIDE RUN JSON...: $row = {scenario, side, run, commit} with the fields of
# each JSON, appended to this run's and (with BENCH_RESULTS) the results' SCENARIO.jsonl.
result() {
  local scenario=$1 side=$2 run=$3
  shift 3
  row=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); [r.update(json.loads(a)) for a in sys.argv[2:]]; print(json.dumps(r))' \
    "{\"scenario\":\"$scenario\",\"side\":\"$side\",\"run\":$run,\"commit\":\"$(git rev-parse --short HEAD)\"}" "$@")
  [ -z "${BENCH_RESULTS:-}" ] || { mkdir -p "$BENCH_RESULTS"; echo "$row" >>"$BENCH_RESULTS/$scenario.jsonl"; }
  echo "$row" >>"$work/$scenario.jsonl"
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ms() { sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{print int(($12 + $13) * 1000 / hz)}'; }

# start_fanout DIR [VAR=VALUE...]: a release node with FANOUT__ settings from the
# environment plus the given ones, on fresh ports, with --config $node_config when that is
# set; waits for /readyz.
start_fanout() {
  local dir=$1
  shift
  mkdir -p "$dir"
  node_public=127.0.0.1:$(free_port) node_admin=127.0.0.1:$(free_port)
  (cd "$dir" && exec env FANOUT__SERVER__LISTEN="$node_public" FANOUT__ADMIN__LISTEN="$node_admin" \
     FANOUT_LOG=warn "$@" "$bin" ${node_config:+--config "$node_config"} serve >"$dir/server.log" 2>&1) &
  node_pid=$!
  track "$node_pid"
  wait_http "http://$node_admin/readyz" || { tail -20 "$dir/server.log" >&2; exit 1; }
}

# How long a consumer's fetch may wait at the broker, on both sides (fanout:
# kafka.options fetch.wait.max.ms; the peer: kafkajs maxWaitTimeInMs, through
# peer-fetch-wait.js). tansu, the former test broker, held every fetch about that long
# even when records were there, so the defaults (500 ms, 5 s) measured the broker's wait,
# not the servers; Apache Kafka answers once records are there, and the value is kept so
# runs stay comparable.
fetch_wait_ms=${BENCH_FETCH_WAIT_MS:-5}

# start_peer DIR TOPIC GROUP: one socket.io peer instance; waits for its "listening" line
# (printed once its Kafka consumer runs).
start_peer() {
  local dir=$1 topic=$2 group=$3
  mkdir -p "$dir"
  node_public=127.0.0.1:$(free_port)
  (cd "$dir" && PORT=${node_public##*:} KAFKA_BROKERS=$kafka KAFKA_TOPIC=$topic \
     KAFKA_GROUP=$group REDIS_URL=$redis_url PEER_DIR=$peer_dir BENCH_FETCH_WAIT_MS=$fetch_wait_ms \
     exec node -r "$bench_d/peer-fetch-wait.js" "$peer_dir/server.js" >"$dir/server.log" 2>&1) &
  node_pid=$!
  track "$node_pid"
  for _ in $(seq 1 600); do grep -q listening "$dir/server.log" && break; kill -0 "$node_pid" || break; sleep 0.1; done
  grep -q listening "$dir/server.log" || { echo "peer did not start:" >&2; cat "$dir/server.log" >&2; exit 1; }
}

# Git commit and machine, for reports.
machine_line() { echo "$(nproc) cores; $(uname -r); $(date -u +%Y-%m-%d); commit $(git rev-parse --short HEAD)"; }
