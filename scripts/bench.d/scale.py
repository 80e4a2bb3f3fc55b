"""Readings and figures of the scale scenario (scripts/bench.d/scale.sh).

  scale.py redis                  INFO (stats, commandstats, cpu) on stdin -> one JSON object
  scale.py nodes ADMIN...         each node's bus messages received and partitions owned
                                  (its /metrics) -> a JSON list, one object per node
  scale.py owned PARTITIONS ADMIN...
                                  exit 0 when every node owns a partition and together all
  scale.py row STEP_JSON PUBLISH_JSON REDIS0 REDIS1 NODES0 NODES1
                                  the step's Redis and bus figures per message -> JSON
  summary(rows)                   the console table (summary.py scale RESULTS.jsonl)
"""
import json
import re
import statistics
import sys
import urllib.request


def redis_info(text):
    """INFO text -> {commands, net_out, net_in, cpu_s, cmd: {name: {calls, usec}}}."""
    kv, cmd = {}, {}
    for line in text.splitlines():
        line = line.strip()
        if ":" not in line or line.startswith("#"):
            continue
        key, value = line.split(":", 1)
        if key.startswith("cmdstat_"):
            fields = dict(f.split("=", 1) for f in value.split(","))
            cmd[key[8:]] = {"calls": int(fields["calls"]), "usec": int(fields["usec"])}
        else:
            kv[key] = value
    return {"commands": int(kv["total_commands_processed"]),
            "net_out": int(kv["total_net_output_bytes"]), "net_in": int(kv["total_net_input_bytes"]),
            "cpu_s": float(kv["used_cpu_sys"]) + float(kv["used_cpu_user"]), "cmd": cmd}


METRIC = re.compile(r'^(fanout_bus_received_total|fanout_kafka_assigned_partitions)(\{[^}]*\})? (\S+)$')


def node_reading(admin):
    """One node's bus payloads received (every channel) and Kafka partitions owned."""
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    out = {"admin": admin, "received": 0, "channels": {}, "partitions": 0}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        value = int(float(m.group(3)))
        if m.group(1) == "fanout_kafka_assigned_partitions":
            out["partitions"] = value
        else:
            channel = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")).get("channel", "")
            out["channels"][channel] = value
            out["received"] += value
    return out


def row(step, publish, r0, r1, n0, n1):
    messages = step["messages"]
    seconds = publish["seconds"] or step["seconds"]
    calls = lambda name: r1["cmd"].get(name, {}).get("calls", 0) - r0["cmd"].get(name, {}).get("calls", 0)
    usec = lambda name: r1["cmd"].get(name, {}).get("usec", 0) - r0["cmd"].get(name, {}).get("usec", 0)
    per = lambda v, digits=3: round(v / messages, digits) if messages else None
    received = [b["received"] - a["received"] for a, b in zip(n0, n1)]
    nodes = len(received)
    return {
        # Our own INFO readings are Redis commands too; they are left out.
        "redis_commands": r1["commands"] - r0["commands"] - calls("info"),
        "redis_commands_per_msg": per(r1["commands"] - r0["commands"] - calls("info")),
        "redis_scripts_per_msg": per(calls("evalsha") + calls("eval")),
        "redis_publish_per_msg": per(calls("publish")),
        "redis_spublish_per_msg": per(calls("spublish")),
        "redis_out_bytes_per_msg": per(r1["net_out"] - r0["net_out"], 1),
        "redis_in_bytes_per_msg": per(r1["net_in"] - r0["net_in"], 1),
        "redis_cpu_us_per_msg": per((r1["cpu_s"] - r0["cpu_s"]) * 1e6, 2),
        "redis_script_us_per_msg": per(usec("evalsha") + usec("eval"), 2),
        "bus_received_per_node": received,
        "bus_received_per_node_per_s": round(sum(received) / nodes / seconds) if nodes and seconds else None,
        "bus_received_per_node_per_msg": round(sum(received) / nodes / messages, 4) if nodes and messages else None,
        "bus_received_per_msg": per(sum(received), 4),
    }


COLUMNS = [
    ("msgs/s", "msgs_per_s", "{:.0f}"),
    ("Redis commands / msg", "redis_commands_per_msg", "{:.2f}"),
    ("scripts / msg", "redis_scripts_per_msg", "{:.3f}"),
    ("PUBLISH+SPUBLISH / msg", "publish_any_per_msg", "{:.3f}"),
    ("Redis bytes out / msg", "redis_out_bytes_per_msg", "{:.0f}"),
    ("Redis bytes in / msg", "redis_in_bytes_per_msg", "{:.0f}"),
    ("bus msgs received / node / s", "bus_received_per_node_per_s", "{:.0f}"),
    ("bus msgs received / node / msg", "bus_received_per_node_per_msg", "{:.3f}"),
    ("Redis CPU µs / msg", "redis_cpu_us_per_msg", "{:.1f}"),
    ("script µs / msg", "redis_script_us_per_msg", "{:.1f}"),
    ("fanout CPU µs / delivery", "cpu_s_per_million", "{:.1f}"),
]


def summary(rows):
    for r in rows:
        r["msgs_per_s"] = r["messages"] / r["seconds"] if r.get("seconds") else None
        r["publish_any_per_msg"] = (r.get("redis_publish_per_msg") or 0) + (r.get("redis_spublish_per_msg") or 0)
    modes = list(dict.fromkeys(r["routing"] for r in rows))
    counts = sorted({r["nodes"] for r in rows})

    def med(mode, n, key):
        vals = [r[key] for r in rows if r["routing"] == mode and r["nodes"] == n and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    groups = [(mode, n) for mode in modes for n in counts
              if any(r["routing"] == mode and r["nodes"] == n for r in rows)]
    print("\nscale: medians over runs, per routing mode and number of nodes "
          f"({rows[0]['users']} users spread evenly, personal messages)\n")
    print("| | " + " | ".join(f"{mode}, {n} node{'s' if n > 1 else ''}" for mode, n in groups) + " |")
    print("|---|" + "---|" * len(groups))
    runs = [len([r for r in rows if r["routing"] == mode and r["nodes"] == n]) for mode, n in groups]
    print("| runs | " + " | ".join(map(str, runs)) + " |")
    for label, key, fmt in COLUMNS:
        cells = []
        for mode, n in groups:
            v = med(mode, n, key)
            cells.append("—" if v is None else fmt.format(v))
        print(f"| {label} | " + " | ".join(cells) + " |")
    for key in ("lost", "dups", "wrong", "dropped"):
        sums = [sum(r[key] for r in rows if r["routing"] == mode and r["nodes"] == n) for mode, n in groups]
        print(f"| {key} (sum over runs) | " + " | ".join(map(str, sums)) + " |")
    bad = sum(r["lost"] + r["dups"] + r["wrong"] + r["dropped"] for r in rows)
    print(f"\ndeliveries not exactly once to their user (lost + dups + wrong) or connections dropped, "
          f"over every run: {bad}")
    if "broadcast" in modes and "routed" in modes:
        print("\ncrossover: the fewest nodes at which routed costs no more than broadcast (medians)")
        for label, key in [("Redis CPU µs / msg", "redis_cpu_us_per_msg"),
                           ("Redis bytes out / msg", "redis_out_bytes_per_msg"),
                           ("Redis commands / msg", "redis_commands_per_msg"),
                           ("fanout CPU µs / delivery", "cpu_s_per_million")]:
            at = [n for n in counts if None not in (med("routed", n, key), med("broadcast", n, key))
                  and med("routed", n, key) <= med("broadcast", n, key)]
            print(f"  {label}: " + (f"{at[0]} node{'s' if at[0] > 1 else ''}" if at else "not within " + ", ".join(map(str, counts)) + " nodes"))
    else:
        print("\n(routed mode not measured: no crossover; BENCH_ROUTING=\"broadcast routed\" once the build has it)")


def main():
    what = sys.argv[1]
    if what == "redis":
        print(json.dumps(redis_info(sys.stdin.read())))
    elif what == "nodes":
        print(json.dumps([node_reading(a) for a in sys.argv[2:]]))
    elif what == "owned":
        parts = [node_reading(a)["partitions"] for a in sys.argv[3:]]
        sys.exit(0 if min(parts) > 0 and sum(parts) == int(sys.argv[2]) else 1)
    elif what == "row":
        step, publish = json.loads(sys.argv[2]), json.load(open(sys.argv[3]))
        r0, r1, n0, n1 = (json.load(open(p)) for p in sys.argv[4:8])
        print(json.dumps(row(step, publish, r0, r1, n0, n1)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
