"""Console summary of a ladder scenario (s2, s3): per side, the highest sustained step of
each run, medians over runs. Usage: summary.py SCENARIO RESULTS.jsonl"""
import json
import statistics
import sys

scenario, path = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(path)]
best = {}
for side in ("fanout", "peer"):
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
print("| | fanout | socket.io peer |")
print("|---|---|---|")
for name, key in [("highest sustained rate, records/s", "rate"), ("deliveries/s", "deliveries_per_s"),
                  ("server CPU-s per million deliveries", "cpu_s_per_million"),
                  ("deliveries per server CPU-second", "deliveries_per_core_s"),
                  ("generator CPU-s per million deliveries", "gen_cpu_s_per_million"),
                  ("wrong deliveries", "wrong"),
                  ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("p99.9 ms", "p999_ms")]:
    print(f"| {name} | {cell('fanout', key)} | {cell('peer', key)} |")
wrong = sum(r["wrong"] for r in rows)
print(f"\nwrong deliveries over every step of every run: {wrong}")
