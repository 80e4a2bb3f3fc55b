# scripts/bench scale [runs] [users]: what the Redis bus costs as fanout nodes are added
# (issue 18), in broadcast mode (every node receives every bus message) and routed mode
# (bus.routing = "routed": a node receives only its users' messages). One private
# redis-server for the whole scenario (so nothing but fanout's traffic moves its figures),
# Kafka as the other scenarios get it, on a topic of BENCH_PARTITIONS (8) partitions, created
# on an external broker too; PostgreSQL as s3. For each run, each N of BENCH_NODES
# ("1 2 4 8") and each mode of BENCH_ROUTING ("broadcast"; "broadcast routed" once the
# build has routed mode): N release nodes (node ids bench-0…, one consumer group),
# `users` (8000) users u0… spread evenly, one connection each on one node, no user muted;
# once every node owns a partition and the warm-up reached every generator, personal
# messages (to.user, message k for user k mod users) at BENCH_RATE (2000) records/s for
# BENCH_STEP (10) seconds, linger BENCH_LINGER_MS (10). BENCH_PER_NODE=1 makes `users` and
# BENCH_RATE per node (N times them in all: per-node load constant as nodes are added).
# Around the step: Redis INFO stats/commandstats/cpu and each node's
# fanout_bus_received_total (every channel) and utime+stime. Figures per message: Redis
# commands (scripts' inner commands included, our INFO calls left out), scripts, PUBLISH and
# SPUBLISH calls, bytes out and in, Redis CPU µs and script µs; bus messages received per
# node per second and per message; fanout CPU µs per delivery; lost/dups/wrong/dropped from
# the generators. A mode the build refuses (`fanout check-config`) stops the scenario before
# anything runs: it is never measured as broadcast.
runs=${1:-${BENCH_RUNS:-3}} users=${2:-8000}
node_counts=${BENCH_NODES:-1 2 4 8}
modes=${BENCH_ROUTING:-broadcast}
rate=${BENCH_RATE:-2000}
seconds=${BENCH_STEP:-10}
linger=${BENCH_LINGER_MS:-10}
per_node=${BENCH_PER_NODE:-}
# Connecting is not what is measured, so it goes gently: BENCH_CONNECT_CONCURRENCY (100)
# attempts in flight over all generators (loadgen --concurrency, divided among the nodes'
# generators), each refused attempt retried up to 6 times (1, 2, … 6 s apart). With 200 per
# generator and 2 retries, the prefs queries of 4 and 8 nodes (a pool of 8 PostgreSQL
# connections each) timed out on the shared machine and 37 to 7300 of 8000 connects failed.
connect_concurrency=${BENCH_CONNECT_CONCURRENCY:-100}
sides=fanout
unset FANOUT__BUS__ROUTING

private_redis
redis_url=redis://127.0.0.1:$private_redis_port
# shellcheck source=ladder.sh
source scripts/bench.d/ladder.sh
partitions=${BENCH_PARTITIONS:-8}
create_topics=always
max_nodes=0
for n in $node_counts; do [ "$n" -le "$max_nodes" ] || max_nodes=$n; done
[ "$partitions" -ge "$max_nodes" ] \
  || { echo "BENCH_PARTITIONS=$partitions: every one of $max_nodes nodes must own a partition" >&2; exit 2; }

# routing_setting MODE: the node setting that selects MODE ("" for broadcast on a build that
# predates bus.routing, where broadcast is the only mode), or exit when the build refuses it.
routing_setting() {
  local mode=$1 out
  case $mode in broadcast | routed) ;; *) echo "BENCH_ROUTING: unknown mode '$mode' (broadcast, routed)" >&2; exit 2 ;; esac
  # check-config validates the whole configuration of a cluster node, so it gets one (the
  # secret and database URL only have to be well-formed: nothing is contacted)
  if out=$(cd "$work" && FANOUT__BUS__ROUTING=$mode FANOUT__REDIS__URL=$redis_url \
             FANOUT__KAFKA__BROKERS="$kafka" FANOUT__DATABASE__URL=postgres://check@127.0.0.1/check \
             FANOUT__AUTH__JWT_SECRET=check-config-only-0123456789abcdef "$bin" check-config 2>&1) \
     && grep -qx "routing = \"$mode\"" <<<"$out"; then
    echo "FANOUT__BUS__ROUTING=$mode"
  elif [ "$mode" = broadcast ] && grep -qF "unknown field \`bus\`" <<<"$out"; then
    echo ""
  else
    echo "scale: this build ($bin) does not run bus.routing = \"$mode\"; fanout check-config said:" >&2
    echo "$out" | tail -5 >&2
    [ "$mode" != routed ] || echo "routed mode is not built yet here: run BENCH_ROUTING=broadcast" >&2
    exit 1
  fi
}
declare -A routing_env
for mode in $modes; do routing_env[$mode]=$(routing_setting "$mode") || exit 1; done

redis_reading() {
  { redis-cli -p "$private_redis_port" info stats; redis-cli -p "$private_redis_port" info commandstats
    redis-cli -p "$private_redis_port" info cpu; } | python3 "$bench_d/scale.py" redis
}

# until every node owns a partition and together all of them (the group has settled)
wait_owned() {
  for _ in $(seq 1 150); do
    python3 "$bench_d/scale.py" owned "$partitions" "${cluster_admins[@]}" && return 0
    sleep 0.2
  done
  echo "the nodes do not own the $partitions partitions between them:" >&2
  python3 "$bench_d/scale.py" nodes "${cluster_admins[@]}" >&2
  exit 1
}

echo "==> scale: nodes $node_counts, routing $modes; $users users${per_node:+ per node}," \
  "to.user at $rate/s${per_node:+ per node} for $seconds s (linger $linger ms), $partitions partitions," \
  "private redis-server $(redis-server --version | grep -o 'v=[^ ]*'), $runs runs"
for r in $(seq 1 "$runs"); do
  for n in $node_counts; do
    for mode in $modes; do
      n_users=$users n_rate=$rate
      [ -z "$per_node" ] || n_users=$((users * n)) n_rate=$((rate * n))
      dir=$work/scale-$mode-$n-$r
      echo "  -- $mode, $n nodes, run $r (load average $(cut -d' ' -f1-3 /proc/loadavg))"
      if [ -n "${routing_env[$mode]}" ]; then export "${routing_env[$mode]?}"; fi
      cluster_up fanout "$n" "$dir"
      unset FANOUT__BUS__ROUTING
      clients_up "$n_users" --concurrency $(( (connect_concurrency + n - 1) / n )) --connect-retries 6
      warm_up
      wait_owned
      step_targets=1
      redis_reading >"$dir/redis0" && python3 "$bench_d/scale.py" nodes "${cluster_admins[@]}" >"$dir/nodes0"
      step "$n_rate" "$seconds" --to users --users "$n_users" --linger-ms "$linger"
      redis_reading >"$dir/redis1" && python3 "$bench_d/scale.py" nodes "${cluster_admins[@]}" >"$dir/nodes1"
      figures=$(python3 "$bench_d/scale.py" row "$step_json" "$dir/publish.json" \
        "$dir/redis0" "$dir/redis1" "$dir/nodes0" "$dir/nodes1")
      result scale fanout "$r" "$step_json" "$figures" \
        "{\"routing\":\"$mode\",\"nodes\":$n,\"users\":$n_users,\"linger_ms\":$linger,\"partitions\":$partitions}"
      python3 - "$row" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"    {r['received']}/{r['expected']} delivered (lost {r['lost']}, dups {r['dups']}, wrong {r['wrong']},"
      f" dropped {r['dropped']}); Redis per msg: {r['redis_commands_per_msg']} commands,"
      f" {r['redis_scripts_per_msg']} scripts, {r['redis_out_bytes_per_msg']} B out,"
      f" {r['redis_cpu_us_per_msg']} µs CPU; bus msgs received per node/s {r['bus_received_per_node_per_s']}"
      f" ({r['bus_received_per_node']}); fanout {r['cpu_s_per_million']} CPU-µs per delivery; p99 {r['p99_ms']} ms")
PY
      cluster_down
    done
  done
done
python3 scripts/bench.d/summary.py scale "$work/scale.jsonl"
echo "(machine: $(machine_line))"
