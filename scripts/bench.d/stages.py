"""Adds fanout's stage latency split to a step's figures. Usage: stages.py METRICS_BEFORE
METRICS_AFTER STEP_JSON; prints STEP_JSON with "stages": {stage: {p50_ms, p99_ms, p999_ms,
count}} from the difference of the fanout_stage_latency_seconds histograms (summed over the
nodes in each file), each quantile interpolated linearly inside its bucket."""
import json
import re
import sys

BUCKET = re.compile(r'^fanout_stage_latency_seconds_bucket\{(.*)\} (\S+)$')


def buckets(path):
    out = {}
    for line in open(path):
        m = BUCKET.match(line.strip())
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (labels["stage"], float(labels["le"]))
        out[key] = out.get(key, 0) + float(m.group(2))
    return out


def quantile(cumulative, q):
    total = cumulative[-1][1]
    if total == 0:
        return None
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= q * total:
            if bound == float("inf"):
                return lo_bound * 1000
            inside = (q * total - lo_count) / (count - lo_count) if count > lo_count else 1
            return round((lo_bound + (bound - lo_bound) * inside) * 1000, 3)
        lo_bound, lo_count = bound, count
    return None


before, after = buckets(sys.argv[1]), buckets(sys.argv[2])
step = json.loads(sys.argv[3])
stages = {}
for stage in sorted({s for s, _ in after}):
    cum = sorted((le, after[(stage, le)] - before.get((stage, le), 0)) for s, le in after if s == stage)
    stages[stage] = {"count": int(cum[-1][1]) if cum else 0,
                     **{f"{name}_ms": quantile(cum, q) for name, q in (("p50", .5), ("p99", .99), ("p999", .999))}}
step["stages"] = stages
print(json.dumps(step))
