# scripts/bench embedded [messages] [runs] [idle-seconds]: the embedded default's
# publish → receive latency of single messages, and its idle CPU; see docs/benchmarks.md,
# "Embedded default". BENCH_BASE_BIN=<another fanout build> runs it too, alternating.
messages=${1:-200} runs=${2:-${BENCH_RUNS:-3}} idle=${3:-20}
gap=${BENCH_GAP_MS:-50-550}
for v in "$messages" "$runs" "$idle"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "embedded: messages, runs and idle-seconds are positive integers" >&2; exit 2; }
done
[[ "$gap" =~ ^[0-9]+-[0-9]+$ ]] || { echo "embedded: BENCH_GAP_MS is a range of milliseconds, lo-hi" >&2; exit 2; }
command -v node >/dev/null || { echo "embedded: needs node (>= 20, for its WebSocket)" >&2; exit 1; }
[ -n "${BENCH_FANOUT_BIN:-}" ] || build
declare -A bins=([fanout]=$bin)
sides=(fanout)
if [ -n "${BENCH_BASE_BIN:-}" ]; then
  [ -x "$BENCH_BASE_BIN" ] || { echo "embedded: BENCH_BASE_BIN $BENCH_BASE_BIN is not executable" >&2; exit 2; }
  bins[base]=$BENCH_BASE_BIN
  sides=(base fanout)
fi

# One run of SIDE: a fresh embedded-default node in an empty working directory (its
# fanout.db there), only the listen addresses set; the latency of `messages` single
# messages, then, with no client, its CPU over `idle` seconds.
run() {
  local side=$1 r=$2 dir="$work/$1-$2" bin=${bins[$1]} latency cpu0 cpu1
  start_fanout "$dir"
  echo "==> $side run $r: $messages single messages (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
  latency=$(node --no-warnings --experimental-websocket "$bench_d/embedded.js" \
    "ws://$node_public/ws" "http://$node_public/v1/publish" "$messages" "$gap") \
    || { echo "embedded: the client failed; node log:" >&2; tail -20 "$dir/server.log" >&2; exit 1; }
  sleep 2
  cpu0=$(cpu_ms "$node_pid")
  sleep "$idle"
  cpu1=$(cpu_ms "$node_pid")
  kill "$node_pid" 2>/dev/null || true
  wait "$node_pid" 2>/dev/null || true
  result embedded "$side" "$r" "$latency" \
    "{\"idle_s\":$idle,\"idle_cpu_ms_per_s\":$(python3 -c "print(round(($cpu1 - $cpu0) / $idle, 2))"),\"bin\":\"$bin\"}"
  echo "$row"
}

echo "(node: embedded default; ${sides[*]}: ${bins[*]}; $messages messages, each after a pause of $gap ms, idle ${idle} s)"
for r in $(seq 1 "$runs"); do
  # Alternate which side goes first.
  if (( r % 2 )); then order=("${sides[@]}"); else order=(); for ((i = ${#sides[@]} - 1; i >= 0; i--)); do order+=("${sides[$i]}"); done; fi
  for side in "${order[@]}"; do run "$side" "$r"; done
done
python3 - "$work/embedded.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ["p50_ms", "p90_ms", "p99_ms", "max_ms", "lost", "publish_p50_ms", "idle_cpu_ms_per_s"]
print("\nmedians over runs:")
print(f"{'side':8} {'runs':>4} " + " ".join(f"{k:>17}" for k in keys))
for side in dict.fromkeys(r["side"] for r in rows):
    rs = [r for r in rows if r["side"] == side]
    med = [statistics.median(r[k] for r in rs if r.get(k) is not None) for k in keys]
    print(f"{side:8} {len(rs):>4} " + " ".join(f"{m:>17g}" for m in med))
PY
echo "(machine: $(machine_line))"
