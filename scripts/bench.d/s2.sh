# scripts/bench s2 [runs] [connections]: broadcast (issue 7, S2). `to: all` records at rising
# rates (BENCH_RATES broadcasts/s, BENCH_STEP seconds each) to N connections on one node of
# each side, until a step is not sustained (see ladder.sh); runs alternate fanout, peer, …
# The records go out in bursts every BENCH_BURST_MS (100) ms — rate 200 is ten bursts of
# 20 a second, the shape of the reference figure for the peer; BENCH_BURST_MS=0
# spaces them evenly. Per step: deliveries/s, server CPU-seconds per million deliveries,
# latency produce → client. See docs/benchmarks.md, "S2 broadcast".
runs=${1:-${BENCH_RUNS:-3}} n=${2:-10000}
rates=${BENCH_RATES:-1 2 5 10 20 50 100 200 300 400 600 800}
seconds=${BENCH_STEP:-10}
burst_ms=${BENCH_BURST_MS:-100}
sides=${BENCH_SIDES:-fanout peer}
source scripts/bench.d/ladder.sh
step_targets=$n
echo "==> S2 broadcast: $n connections, steps of $seconds s at $rates broadcasts/s (bursts every $burst_ms ms), $runs runs per side, alternating"
run_steps() {
  local rate
  for rate in $rates; do
    step "$rate" "$seconds" --to all --burst-every-ms "$burst_ms"
    record s2 "$1" "$2"
    sustained || break
  done
}
alternate s2 1 "$n"
python3 scripts/bench.d/summary.py s2 "$work/s2.jsonl"
echo "(machine: $(machine_line))"
