# scripts/bench s1 [connections] [runs]: idle connections, fanout against the socket.io
# peer; see docs/benchmarks.md, "S1 idle".
n=${1:-19000} runs=${2:-3}
per_shard=${BENCH_PER_SHARD:-9500} sources=${BENCH_SOURCES:-16} settle=${BENCH_SETTLE:-5}
shards=$(( (n + per_shard - 1) / per_shard ))
sides=${BENCH_SIDES:-fanout peer}
build loadgen
gen=$examples/loadgen
if [[ " $sides " = *" peer "* ]]; then
  need_peer
  need_redis
  need_kafka
  peer_topic=bench-s1-$RANDOM$RANDOM
  new_topic "$peer_topic" 4
fi
results=$work/s1.tsv
# One idle run: a fresh server, RSS before, N connections from $shards generator
# processes, RSS after they all connected and $settle s passed.
run() {
  local side=$1 r=$2 dir="$work/$1-$2" pid rss0 rss1 cpu0 cpu1 fds k gpids=() proto
  if [ "$side" = fanout ]; then
    proto=fanout
    start_fanout "$dir" FANOUT__SERVER__MAX_CONNECTIONS=$((n + 1000))
  else
    proto=socketio
    start_peer "$dir" "$peer_topic" "bench-s1-$r-$RANDOM"
  fi
  pid=$node_pid
  sleep "$settle"
  rss0=$(rss_kib "$pid") cpu0=$(cpu_ms "$pid")
  for k in $(seq 1 "$shards"); do
    "$gen" --proto "$proto" --target "$node_public" --connections "$n" --shard "$k/$shards" \
      --sources "$sources" --ready-file "$dir/ready$k" >"$dir/summary$k.json" 2>"$dir/gen$k.log" &
    gpids+=($!)
  done
  for _ in $(seq 1 3000); do
    local all=1
    for k in $(seq 1 "$shards"); do [ -s "$dir/ready$k" ] || all=0; done
    [ $all = 1 ] && break
    sleep 0.1
  done
  sleep "$settle"
  rss1=$(rss_kib "$pid") cpu1=$(cpu_ms "$pid")
  fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  kill -TERM "${gpids[@]}" 2>/dev/null || true
  wait "${gpids[@]}" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 - "$side" "$r" "$rss0" "$rss1" "$fds" "$((cpu1 - cpu0))" "$dir"/summary*.json >>"$results" <<'PY'
import json, sys
side, r, rss0, rss1, fds, cpu_ms, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7:]
s = [json.loads(open(f).read().strip().splitlines()[-1]) for f in files]
conn = sum(x["connected"] for x in s); failed = sum(x["failed"] for x in s)
wall = (max(x["done_ms"] for x in s) - min(x["start_ms"] for x in s)) / 1000
errors = {}
for x in s:
    for k, v in x["errors"].items(): errors[k] = errors.get(k, 0) + v
per = (rss1 - rss0) / conn if conn else float("nan")
print("\t".join(map(str, [side, r, conn, failed, f"{wall:.2f}", f"{conn / wall:.0f}" if wall else "nan",
                          rss0, rss1, f"{per:.2f}", fds, json.dumps(errors), f"{cpu_ms / conn * 1000:.0f}" if conn else "nan"])))
PY
  tail -1 "$results" | awk -F'\t' '{printf "    %-6s run %s: %s connected, %s failed in %s s (%s/s); RSS %s -> %s KiB = %s KiB/conn; %s fds; server CPU %s ms per 1000 connections%s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, ($11 == "{}" ? "" : "; errors " $11)}'
}
echo "==> S1 idle: $n connections, $shards generator processes, $sources source addresses, $runs runs per side, alternating"
for r in $(seq 1 "$runs"); do
  for side in $sides; do run "$side" "$r"; done
done
python3 - "$results" "$n" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
med = {}
for side in ("fanout", "peer"):
    rs = [r for r in rows if r[0] == side]
    if not rs: continue
    m = lambda i, f=float: statistics.median(f(r[i]) for r in rs)
    med[side] = dict(conn=m(2), failed=m(3), rate=m(5), rss0=m(6) / 1024, rss1=m(7) / 1024, per=m(8), cpu=m(11), runs=len(rs))
print(f"\nS1 idle, N = {sys.argv[2]} (medians of {max(v['runs'] for v in med.values())} runs)\n")
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
echo "(machine: $(machine_line))"
