# scripts/bench s4 [runs] [fanout-rate] [peer-rate] [connections]: latency at a moderate
# load (issue 7, S4): each side at half its highest sustained S2 rate (from
# $BENCH_RESULTS/s2.jsonl when there, else the rates given; defaults 100 and 5 broadcasts/s)
# for BENCH_STEP (20) s to N connections (10000) on one node. Latency produce → client
# p50/p99/p99.9 from the generators; for fanout also split into its stages from the node's
# fanout_stage_latency_seconds histogram: kafka (record timestamp → ingest), bus (ingest →
# router, across Redis) and send (router → written to the socket).
runs=${1:-${BENCH_RUNS:-3}} n=${4:-10000}
seconds=${BENCH_STEP:-20}
sides=${BENCH_SIDES:-fanout peer}
declare -A rate=([fanout]=${2:-} [peer]=${3:-})
for side in fanout peer; do
  if [ -z "${rate[$side]}" ] && [ -s "${BENCH_RESULTS:-/nonexistent}/s2.jsonl" ]; then
    rate[$side]=$(python3 - "$BENCH_RESULTS/s2.jsonl" "$side" <<'PY'
import json, statistics, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["side"] == sys.argv[2] and r["sustained"]:
        best[r["run"]] = max(best.get(r["run"], 0), r["rate"])
print(f"{statistics.median(best.values()) / 2:g}" if best else "")
PY
)
  fi
done
rate[fanout]=${rate[fanout]:-100} rate[peer]=${rate[peer]:-5}
source scripts/bench.d/ladder.sh
step_targets=$n
echo "==> S4 latency: $n connections, $seconds s at fanout ${rate[fanout]}/s, peer ${rate[peer]}/s broadcasts, $runs runs per side"
run_steps() {
  step "${rate[$1]}" "$seconds" --to all
  record s4 "$1" "$2"
}
alternate s4 1 "$n"
python3 - "$work/s4.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda side, f: (lambda v: f"{statistics.median(v):g}" if v else "—")([f(r) for r in rows if r["side"] == side and f(r) is not None])
print("\nS4 latency, produce → client, medians over runs\n")
print("| | fanout | socket.io peer |")
print("|---|---|---|")
print(f"| rate, broadcasts/s | {med('fanout', lambda r: r['rate'])} | {med('peer', lambda r: r['rate'])} |")
for q in ("p50", "p99", "p999"):
    print(f"| {q} ms | {med('fanout', lambda r: r[q + '_ms'])} | {med('peer', lambda r: r[q + '_ms'])} |")
for stage in ("kafka", "bus", "send"):
    cells = " / ".join(med("fanout", lambda r: r.get("stages", {}).get(stage, {}).get(q + "_ms")) for q in ("p50", "p99", "p999"))
    print(f"| fanout stage {stage}: p50 / p99 / p99.9 ms | {cells} | |")
PY
echo "(machine: $(machine_line))"
