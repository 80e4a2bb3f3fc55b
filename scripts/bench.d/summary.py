"""Console summary of a ladder scenario (s2, s3): per side, the highest sustained step of
each run, medians over runs; then, per rate every side reached, the medians of that step
(CPU per million deliveries, latency), to compare builds or settings at equal load.
The scale scenario has its own table (scale.py).
Usage: summary.py SCENARIO RESULTS.jsonl"""
import json
import statistics
import sys

scenario, path = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(path)]
if scenario == "scale":
    from scale import summary  # scripts/bench.d/scale.py
    summary(rows)
    sys.exit(0)
NAMES = {"fanout": "fanout", "peer": "socket.io peer", "fanout-on": "fanout, receipts + presence on",
         "base": "base build (BENCH_BASE_BIN)"}
sides = list(dict.fromkeys(r["side"] for r in rows))
best = {}
for side in sides:
    runs = {}
    for r in rows:
        if r["side"] == side and r["sustained"] and (r["run"] not in runs or r["rate"] > runs[r["run"]]["rate"]):
            runs[r["run"]] = r
    best[side] = list(runs.values())
failed = {side: sorted({r["run"] for r in rows if r["side"] == side}) for side in best}


def cell(side, key):
    vals = [r[key] for r in best[side] if r.get(key) is not None]
    if not vals:
        return "—"
    return f"{statistics.median(vals):g} ({len(vals)} of {len(failed[side])} runs)"


print(f"\n{scenario}: the highest sustained step of each run, medians over runs\n")
print("| | " + " | ".join(NAMES.get(s, s) for s in sides) + " |")
print("|---|" + "---|" * len(sides))
for name, key in [("highest sustained rate, records/s", "rate"), ("deliveries/s", "deliveries_per_s"),
                  ("server CPU-s per million deliveries", "cpu_s_per_million"),
                  ("deliveries per server CPU-second", "deliveries_per_core_s"),
                  ("generator CPU-s per million deliveries", "gen_cpu_s_per_million"),
                  ("wrong deliveries", "wrong"),
                  ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("p99.9 ms", "p999_ms")]:
    print(f"| {name} | " + " | ".join(cell(s, key) for s in sides) + " |")
wrong = sum(r["wrong"] for r in rows)
print(f"\nwrong deliveries over every step of every run: {wrong}")

if len(sides) > 1:
    rates = sorted({r["rate"] for r in rows if all(
        any(x["side"] == s and x["rate"] == r["rate"] and x["sustained"] for x in rows) for s in sides)})
    if rates:
        print("\nper rate every side sustained in some run: medians over its sustained runs"
              " (server CPU-s per million deliveries; p50 / p99 ms)\n")
        print("| rate/s | " + " | ".join(NAMES.get(s, s) for s in sides) + " |")
        print("|---|" + "---|" * len(sides))
        for rate in rates:
            cells = []
            for s in sides:
                at = [x for x in rows if x["side"] == s and x["rate"] == rate and x["sustained"]]
                med = lambda k: statistics.median([x[k] for x in at if x.get(k) is not None] or [float("nan")])
                cells.append(f"{med('cpu_s_per_million'):.3g}; {med('p50_ms'):.3g} / {med('p99_ms'):.3g} ({len(at)} runs)")
            print(f"| {rate:g} | " + " | ".join(cells) + " |")
