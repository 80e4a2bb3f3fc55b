# scripts/bench s1 [connections] [runs] [nodes]: idle connections on a cluster of fanout
# nodes against as many socket.io peer instances; see docs/benchmarks.md, "S1 idle".
n=${1:-19000} runs=${2:-3} nodes=${3:-1}
per_shard=${BENCH_PER_SHARD:-9500} sources=${BENCH_SOURCES:-16} settle=${BENCH_SETTLE:-5}
sides=${BENCH_SIDES:-fanout peer}
for v in "$n" "$runs" "$nodes" "$per_shard"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "s1: connections, runs, nodes and BENCH_PER_SHARD are positive integers" >&2; exit 2; }
done
[ "$nodes" -le "$n" ] || { echo "s1: more nodes than connections" >&2; exit 2; }
build loadgen
gen=$examples/loadgen
need_redis
need_kafka
# One topic (6 partitions: 1, 2 or 3 nodes each get a whole share) on one broker, one
# Redis, for both sides; each run has its own consumer group and Redis prefix.
topic=bench-s1-$RANDOM$RANDOM
new_topic "$topic" 6
secret=bench-s1-secret
if [[ " $sides " = *" fanout "* ]]; then
  need_postgres
  db_url=$(new_database)
  cat >"$work/types.toml" <<'TOML'
[[types]]
name = "robot.reply"
[[types]]
name = "marketing"
default = false
TOML
  node_config=$work/types.toml
fi
if [[ " $sides " = *" peer "* ]]; then need_peer; fi
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock examples 2>/dev/null || echo -dirty)
results=$work/s1.jsonl
failures=0

# The connections of node J (0-based): n spread evenly, the first n % nodes get one more.
node_share() { echo $(( n / nodes + ($1 < n % nodes ? 1 : 0) )); }

# start_side SIDE R DIR: the run's N servers; sets the arrays pids_ and publics_. A fanout
# node keeps server.max_pending_connections files for handshakes out of its 20,000 (the
# default 2048 left room for 17,760 clients: 19,000 on one node did not fit); 512 is more
# than the generators' attempts in flight (loadgen --concurrency 200, two per node at 19,000).
start_side() {
  local side=$1 r=$2 dir=$3 j group=bench-s1-$2-$RANDOM$RANDOM
  pids_=() publics_=()
  for j in $(seq 0 $((nodes - 1))); do
    if [ "$side" = fanout ]; then
      start_fanout "$dir/node$j" \
        FANOUT__NODE__ID="s1-$r-$j" FANOUT__KAFKA__BROKERS="$kafka" FANOUT__KAFKA__TOPICS="$topic" \
        FANOUT__KAFKA__GROUP_ID="$group" FANOUT__REDIS__URL="$redis_url" FANOUT__REDIS__PREFIX="$group" \
        FANOUT__DATABASE__URL="$db_url" FANOUT__AUTH__JWT_SECRET="$secret" \
        FANOUT__SERVER__MAX_CONNECTIONS=$(( $(node_share "$j") + 1000 )) \
        FANOUT__SERVER__MAX_PENDING_CONNECTIONS=512
    else
      start_peer "$dir/node$j" "$topic" "$group"
    fi
    pids_+=("$node_pid") publics_+=("$node_public")
  done
}

# One idle run: fresh servers, their RSS and CPU before; every node's share of the N
# connections from ceil(share / per_shard) generator processes; RSS and CPU again once
# they were all attempted and $settle s passed.
run() {
  local side=$1 r=$2 dir="$work/$1-$2" j k sh share gpids=() readings=() ready=() load
  start_side "$side" "$r" "$dir"
  sleep "$settle"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  local before=()
  for j in "${!pids_[@]}"; do before+=("$(rss_kib "${pids_[$j]}") $(cpu_ms "${pids_[$j]}")"); done
  for j in "${!pids_[@]}"; do
    share=$(node_share "$j") sh=$(( ($(node_share "$j") + per_shard - 1) / per_shard ))
    for k in $(seq 1 "$sh"); do
      local args=(--target "${publics_[$j]}" --connections "$share" --shard "$k/$sh"
        --sources "$sources" --user-prefix "n${j}u" --ready-file "$dir/ready$j-$k")
      if [ "$side" = fanout ]; then args+=(--proto fanout --token-secret "$secret"); else args+=(--proto socketio); fi
      "$gen" "${args[@]}" >"$dir/summary$j-$k.json" 2>"$dir/gen$j-$k.log" &
      gpids+=($!)
      track $!
      ready+=("$dir/ready$j-$k")
    done
  done
  wait_files 3000 "${ready[@]}" || true
  sleep "$settle"
  for j in "${!pids_[@]}"; do
    readings+=("${before[$j]} $(rss_kib "${pids_[$j]}") $(cpu_ms "${pids_[$j]}") $(find "/proc/${pids_[$j]}/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)")
  done
  kill -TERM "${gpids[@]}" 2>/dev/null || true
  wait "${gpids[@]}" 2>/dev/null || true
  kill "${pids_[@]}" 2>/dev/null || true
  wait "${pids_[@]}" 2>/dev/null || true
  if ! S1_SIDE=$side S1_RUN=$r S1_NODES=$nodes S1_N=$n S1_COMMIT=$commit S1_LOAD=$load \
    S1_SOURCES=$sources S1_READINGS="$(printf '%s\n' "${readings[@]}")" S1_OUT=$results \
    python3 - "$dir"/summary*.json <<'PY'
import json, os, sys, time
e = os.environ
s = [json.loads(open(f).read().strip().splitlines()[-1]) for f in sys.argv[1:]]
# One line per node: RSS (KiB) and CPU (ms) before, the same after, open files.
nodes = [dict(zip(("rss0", "cpu0", "rss1", "cpu1", "fds"), map(int, l.split())))
         for l in e["S1_READINGS"].splitlines() if l.strip()]
conn = sum(x["connected"] for x in s)
failed = sum(x["failed"] for x in s)
wall = (max(x["done_ms"] for x in s) - min(x["start_ms"] for x in s)) / 1000
errors = {}
for x in s:
    for k, v in x["errors"].items():
        errors[k] = errors.get(k, 0) + v
rss0, rss1 = sum(x["rss0"] for x in nodes), sum(x["rss1"] for x in nodes)
cpu = sum(x["cpu1"] - x["cpu0"] for x in nodes)
x = {
    "scenario": "s1", "side": e["S1_SIDE"], "run": int(e["S1_RUN"]), "nodes": int(e["S1_NODES"]),
    "connections": int(e["S1_N"]), "connected": conn, "failed": failed,
    "rss_before_kib": rss0, "rss_after_kib": rss1,
    "rss_per_conn_kib": round((rss1 - rss0) / conn, 3) if conn else None,
    "connect_secs": round(wall, 3), "connect_rate": round(conn / wall, 1) if wall and conn else None,
    "cpu_ms_per_1000": round(cpu / conn * 1000, 1) if conn else None,
    "fds": sum(x["fds"] for x in nodes), "errors": errors, "generators": len(s),
    "sources": int(e["S1_SOURCES"]), "per_node": nodes, "load_before": e["S1_LOAD"],
    "commit": e["S1_COMMIT"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
with open(e["S1_OUT"], "a") as out:
    out.write(json.dumps(x) + "\n")
fmt = lambda v, f: "nan" if v is None else format(v, f)
print(f"    {x['side']:<6} run {x['run']}: {conn} connected, {failed} failed in {wall:.2f} s "
      f"({fmt(x['connect_rate'], '.0f')}/s); RSS {rss0} -> {rss1} KiB = {fmt(x['rss_per_conn_kib'], '.2f')} KiB/conn; "
      f"{x['fds']} fds; server CPU {fmt(x['cpu_ms_per_1000'], '.0f')} ms per 1000 connections; "
      f"load before {x['load_before']}" + (f"; errors {json.dumps(errors)}" if errors else ""))
sys.exit(0 if conn == x["connections"] else 3)
PY
  then
    echo "    WARNING: not every connection connected (logs in $dir)" >&2
    failures=$((failures + 1))
  fi
  [ -z "${BENCH_RESULTS:-}" ] || { mkdir -p "$BENCH_RESULTS" && tail -1 "$results" >>"$BENCH_RESULTS/s1.jsonl"; }
}

echo "==> S1 idle: $n connections over $nodes node(s) per side, at most $per_shard per generator process, $sources source addresses, $runs runs per side, alternating (commit $commit)"
for r in $(seq 1 "$runs"); do
  for side in $sides; do run "$side" "$r"; done
done
python3 - "$results" "$n" "$nodes" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for side in ("fanout", "peer"):
    rs = [r for r in rows if r["side"] == side]
    if not rs: continue
    m = lambda k: statistics.median([r[k] for r in rs if r[k] is not None] or [float("nan")])
    med[side] = dict(conn=m("connected"), failed=m("failed"), rate=m("connect_rate"),
                     rss0=m("rss_before_kib") / 1024, rss1=m("rss_after_kib") / 1024,
                     per=m("rss_per_conn_kib"), cpu=m("cpu_ms_per_1000"), runs=len(rs))
n, nodes = sys.argv[2], int(sys.argv[3])
where = "one node" if nodes == 1 else f"{nodes} nodes per side, RSS and CPU summed over them"
print(f"\nS1 idle, N = {n}, {where} (medians of {max(v['runs'] for v in med.values())} runs)\n")
print("| | fanout | socket.io peer | fanout's advantage |")
print("|---|---|---|---|")
def row(name, key, fmt, ratio=True, higher_better=False):
    f, p = med.get("fanout"), med.get("peer")
    cells = [fmt.format(x[key]) if x else "—" for x in (f, p)]
    a, b = (f, p) if higher_better else (p, f)
    q = f"{a[key] / b[key]:.2f}×" if ratio and f and p and b[key] else "—"
    print(f"| {name} | {cells[0]} | {cells[1]} | {q} |")
row("connected", "conn", "{:.0f}", False)
row("failed", "failed", "{:.0f}", False)
row("RSS before, MiB", "rss0", "{:.1f}")
row("RSS with N idle connections, MiB", "rss1", "{:.1f}")
row("RSS per connection, KiB", "per", "{:.2f}")
row("connect rate, connections/s", "rate", "{:.0f}", higher_better=True)
row("server CPU while connecting, ms per 1000 connections", "cpu", "{:.0f}")
PY
echo "(fanout: cluster nodes on Apache Kafka, Redis and PostgreSQL, JWT auth; peer: socket.io instances on the same Kafka topic and Redis)"
echo "(machine: $(machine_line))"
[ -z "${BENCH_RESULTS:-}" ] || echo "(one JSON object per run appended to $BENCH_RESULTS/s1.jsonl)"
[ "$failures" = 0 ] || { echo "$failures run(s) did not connect every connection" >&2; exit 1; }
