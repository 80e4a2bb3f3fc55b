# Sourced by the message scenarios (s2, s3, s4): one side's cluster on a fresh topic,
# load generators connected to it, and rate steps, each measured as one loadgen interval.
#
#   cluster_up SIDE NODES DIR     fanout or peer servers in one cluster (same topic, group,
#                                 Redis); sets cluster_pids, cluster_targets, cluster_admins.
#                                 fanout sides: `fanout` (this build, receipts and presence
#                                 topics off), `fanout-on` (this build, both topics on),
#                                 `base` (BENCH_BASE_BIN, another build, topics off)
#   clients_up N [loadgen args]   N connections spread evenly over the nodes, at most
#                                 $per_shard per generator process; users u0…u(N-1)
#   warm_up                       until every consumer owns its partitions (see publisher.rs)
#   step RATE SECONDS [publisher args]
#                                 one measured step; sets step_json to its figures
#   cluster_down                  stops generators and servers
#   alternate SCENARIO NODES N [loadgen args]
#                                 every run and side: cluster_up, clients_up, warm_up,
#                                 the scenario's run_steps SIDE RUN, cluster_down
#   record SCENARIO SIDE RUN [JSON], sustained
#                                 the step's results row; whether the step was sustained
#
# Figures of a step (step_json): messages, expected deliveries (messages × connections
# they target, given as $step_targets), received (first copies), lost, dups, wrong,
# dropped (connections closed meanwhile), deliveries_per_s, server_cpu_s (utime+stime of
# every server process over the step and its drain), cpu_s_per_million,
# deliveries_per_core_s, gen_cpu_s_per_million, p50/p99/p99.9/max latency in ms
# (produce → client, the highest of the generator processes' figures) and, for fanout,
# "stages": the same quantiles of each stage from the nodes' histograms (stages.py). A step is
# **sustained** when nothing was lost, duplicated or wrong and no connection was dropped,
# with every delivery in by $drain seconds after the last record was produced.

# What every message scenario needs, for the sides in $sides.
need_redis
need_kafka
# fanout_side SIDE: whether SIDE is a fanout build (anything but the socket.io peer).
fanout_side() { [ "$1" != peer ]; }
for s in $sides; do fanout_side "$s" && { need_postgres; break; }; done
if [[ " $sides " = *" base "* ]]; then
  [ -x "${BENCH_BASE_BIN:-}" ] || { echo "side base needs BENCH_BASE_BIN=<another fanout build>" >&2; exit 2; }
fi
[[ " $sides " = *" peer "* ]] && need_peer
build loadgen publisher

per_shard=${BENCH_PER_SHARD:-9500}
sources=${BENCH_SOURCES:-16}
drain=${BENCH_DRAIN:-2}
partitions=4
secret=bench-secret
shared_db="" base_db=""

cat >"$work/types.toml" <<TOML
[kafka.options]
"fetch.wait.max.ms" = "$fetch_wait_ms"

[[types]]
name = "robot.reply"
default = true
TOML

cluster_up() {
  local side=$1 nodes=$2 dir=$3 i
  cluster_side=$side cluster_dir=$dir cluster_pids=() cluster_targets=() cluster_admins=()
  topic=bench-$side-$RANDOM$RANDOM
  new_topic "$topic" "$partitions"
  for i in $(seq 0 $((nodes - 1))); do
    if fanout_side "$side"; then
      local extra=() node_bin=$bin db
      if [ "$side" = base ]; then
        # Its own database: an older build may refuse one a newer build migrated.
        node_bin=$BENCH_BASE_BIN
        [ -n "$base_db" ] || base_db=$(new_database)
        db=$base_db
      else
        [ -n "$shared_db" ] || shared_db=$(new_database)
        db=$shared_db
      fi
      cluster_db=$db
      if [ "$side" = fanout-on ]; then
        # Receipts and presence on: both topics exist before the nodes start.
        [ "$i" != 0 ] || { new_topic "$topic-receipts" "$partitions"; new_topic "$topic-presence" "$partitions"; }
        extra=(FANOUT__KAFKA__RECEIPTS_TOPIC="$topic-receipts" FANOUT__KAFKA__PRESENCE_TOPIC="$topic-presence")
      fi
      bin=$node_bin node_config=$work/types.toml start_fanout "$dir/node$i" "${extra[@]}" \
        FANOUT__NODE__ID="bench-$i" FANOUT__KAFKA__BROKERS="$kafka" FANOUT__KAFKA__TOPICS="$topic" \
        FANOUT__KAFKA__GROUP_ID="$topic" FANOUT__REDIS__URL="$redis_url" FANOUT__REDIS__PREFIX="$topic" \
        FANOUT__DATABASE__URL="$db" FANOUT__AUTH__JWT_SECRET="$secret" \
        FANOUT__SERVER__MAX_CONNECTIONS=20000 FANOUT__SERVER__MAX_FRAMES_PER_SEC=1000
      cluster_admins+=("$node_admin")
    else
      start_peer "$dir/node$i" "$topic" "$topic"
    fi
    cluster_pids+=("$node_pid")
    cluster_targets+=("$node_public")
  done
}

clients_up() {
  local n=$1 nodes=${#cluster_targets[@]} i k per shards proto=fanout auth=()
  shift
  [ "$cluster_side" = peer ] && proto=socketio
  fanout_side "$cluster_side" && auth=(--token-secret "$secret")
  gen_pids=() gen_out=() gen_warm=() gen_connected=0
  per=$(( (n + nodes - 1) / nodes ))
  for i in $(seq 0 $((nodes - 1))); do
    local count=$(( n - i * per < per ? n - i * per : per ))
    shards=$(( (count + per_shard - 1) / per_shard ))
    for k in $(seq 1 "$shards"); do
      local tag="$cluster_dir/gen$i-$k"
      "$examples/loadgen" --proto "$proto" --target "${cluster_targets[$i]}" --connections "$count" \
        --offset $((i * per)) --shard "$k/$shards" --sources "$sources" "${auth[@]}" \
        --ready-file "$tag.ready" --warm-file "$tag.warm" "$@" >"$tag.out" 2>"$tag.log" &
      gen_pids+=($!)
      track $!
      gen_out+=("$tag.out")
      gen_warm+=("$tag.warm")
    done
  done
  local f
  wait_files 1200 "${gen_out[@]/%.out/.ready}" || true
  for f in "${gen_out[@]}"; do
    [ -s "${f%.out}.ready" ] || { echo "a load generator did not finish connecting: ${f%.out}.log" >&2; exit 1; }
    gen_connected=$(( gen_connected + $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["connected"])' "${f%.out}.ready") ))
  done
  [ "$gen_connected" = "$n" ] || { echo "only $gen_connected of $n connections connected (see $cluster_dir/gen*.log)" >&2; exit 1; }
}

warm_up() {
  "$examples/publisher" --brokers "$kafka" --topic "$topic" --partitions "$partitions" \
    --warmup "${gen_warm[0]}" >"$cluster_dir/warmup.json"
  wait_files 300 "${gen_warm[@]}" || { echo "warm-up did not reach every generator" >&2; exit 1; }
  sleep 1
}

# alternate SCENARIO NODES N [loadgen args]: for each run 1…$runs and each side of $sides, a
# fresh cluster of NODES with N connections, warmed up, then `run_steps SIDE RUN` (the
# scenario's); `before_clients SIDE`, when the scenario defines it, runs before connecting.
alternate() {
  local scenario=$1 nodes=$2 n=$3 r side
  shift 3
  for r in $(seq 1 "$runs"); do
    for side in $sides; do
      echo "  -- $side, run $r (load average $(cut -d' ' -f1-3 /proc/loadavg))"
      cluster_up "$side" "$nodes" "$work/$scenario-$side-$r"
      if declare -F before_clients >/dev/null; then before_clients "$side"; fi
      clients_up "$n" "$@"
      warm_up
      run_steps "$side" "$r"
      cluster_down
    done
  done
}

# sustained: whether the last step ($step_json) was sustained.
sustained() { python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["sustained"] else 1)' "$step_json"; }

sum_cpu_ms() { local t=0 p; for p in "$@"; do t=$(( t + $(cpu_ms "$p") )); done; echo "$t"; }

# step RATE SECONDS [publisher args]: $step_targets = connections each message targets, or
# users:U when message k is for user k mod U and only even users accept its type.
step() {
  local rate=$1 seconds=$2 cpu0 cpu1 gcpu0 gcpu1 lines=() f p
  shift 2
  for f in "${gen_out[@]}"; do lines+=("$(wc -l <"$f")"); done
  fanout_side "$cluster_side" && node_metrics >"$cluster_dir/metrics0"
  cpu0=$(sum_cpu_ms "${cluster_pids[@]}") gcpu0=$(sum_cpu_ms "${gen_pids[@]}")
  "$examples/publisher" --brokers "$kafka" --topic "$topic" --rate "$rate" --seconds "$seconds" "$@" \
    >"$cluster_dir/publish.json"
  sleep "$drain"
  cpu1=$(sum_cpu_ms "${cluster_pids[@]}") gcpu1=$(sum_cpu_ms "${gen_pids[@]}")
  fanout_side "$cluster_side" && node_metrics >"$cluster_dir/metrics1"
  for p in "${gen_pids[@]}"; do kill -USR1 "$p"; done
  local i=0
  for f in "${gen_out[@]}"; do
    for _ in $(seq 1 100); do [ "$(wc -l <"$f")" -gt "${lines[$i]}" ] && break; sleep 0.05; done
    i=$((i + 1))
  done
  step_json=$(python3 - "$rate" "$seconds" "$step_targets" "$gen_connected" $((cpu1 - cpu0)) $((gcpu1 - gcpu0)) \
    "$cluster_dir/publish.json" "${gen_out[@]}" <<'PY'
import json, sys
rate, seconds, targets, connected = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cpu_s, gen_cpu_s = int(sys.argv[5]) / 1000, int(sys.argv[6]) / 1000
pub = json.load(open(sys.argv[7]))
shards = [json.loads(open(f).read().strip().splitlines()[-1]) for f in sys.argv[8:]]
messages = pub["sent"]
if targets.startswith("users:"):
    # Message k is for user k mod U, and only even users accept it (s3).
    users = int(targets[6:])
    full, rest = divmod(messages, users)
    expected = full * ((users + 1) // 2) + (rest + 1) // 2
else:
    expected = messages * int(targets)
received = sum(s["distinct"] for s in shards)
dups = sum(s["dups"] for s in shards)
wrong = sum(s["wrong"] for s in shards)
dropped = sum(s["dropped"] for s in shards)
worst = lambda k: max((s[k] for s in shards if s.get(k) is not None), default=None)
per_million = lambda c: round(c / (received / 1e6), 3) if received else None
print(json.dumps({
    "rate": rate, "seconds": seconds, "messages": messages, "connections": connected,
    "expected": expected, "received": received, "lost": expected - received, "dups": dups,
    "wrong": wrong, "dropped": dropped,
    "deliveries_per_s": round(received / pub["seconds"]) if pub["seconds"] else None,
    "server_cpu_s": cpu_s, "cpu_s_per_million": per_million(cpu_s),
    "deliveries_per_core_s": round(received / cpu_s) if cpu_s else None,
    "gen_cpu_s_per_million": per_million(gen_cpu_s),
    "p50_ms": worst("p50_ms"), "p99_ms": worst("p99_ms"), "p999_ms": worst("p999_ms"), "max_ms": worst("max_ms"),
    "sustained": expected == received and dups == 0 and wrong == 0 and dropped == 0,
}))
PY
)
  if fanout_side "$cluster_side"; then
    step_json=$(python3 scripts/bench.d/stages.py "$cluster_dir/metrics0" "$cluster_dir/metrics1" "$step_json")
  fi
}

# The Prometheus text of every fanout node of the cluster.
node_metrics() { local a; for a in "${cluster_admins[@]}"; do curl -sf "http://$a/metrics"; done; }

# record SCENARIO SIDE RUN [JSON]: prints the step and appends it (with the fields of JSON,
# if given) to the results.
record() {
  result "$1" "$2" "$3" "$step_json" "${4:-"{}"}"
  python3 - "$row" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
verdict = "sustained" if r["sustained"] else "NOT sustained"
print(f"    {r['side']:6} run {r['run']}: {r['rate']:g}/s x {r['seconds']:g} s -> {r['received']}/{r['expected']} delivered"
      f" ({r['deliveries_per_s']}/s), lost {r['lost']}, dups {r['dups']}, wrong {r['wrong']}, dropped {r['dropped']};"
      f" server {r['server_cpu_s']} CPU-s = {r['cpu_s_per_million']} per million (generators"
      f" {r['gen_cpu_s_per_million']}); p50/p99/p99.9"
      f" {r['p50_ms']}/{r['p99_ms']}/{r['p999_ms']} ms; {verdict}")
for stage, q in r.get("stages", {}).items():
    print(f"           stage {stage}: p50/p99/p99.9 {q['p50_ms']}/{q['p99_ms']}/{q['p999_ms']} ms ({q['count']} samples)")
PY
}

cluster_down() {
  local p
  for p in "${gen_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${gen_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${cluster_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${cluster_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # Its keys go with it (the bus's streams and bodies, presence, receipt claims, kept for
  # recovery.window otherwise): the next run, of either side, starts from the same Redis.
  if fanout_side "$cluster_side"; then
    redis-cli -u "$redis_url" --scan --pattern "$topic:*" | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null
  fi
}
