#!/usr/bin/env python3
"""The benchmark report of issue 7: report.py RESULTS_DIR [OUT_DIR]

Reads RESULTS_DIR/{s1,s2,s3,s4}.jsonl (one JSON object per run, per rate step for s2; the
schema is scripts/bench.d/RESULTS.md) and, when scripts/bench all made the directory, its
machine.json and steps.tsv. Writes OUT_DIR/report.md (default OUT_DIR = RESULTS_DIR): per
scenario a table of medians over runs for fanout and the socket.io peer, fanout's advantage
(ratios oriented so that > 1 means fanout is better), the targets of issue 7 met or not;
and OUT_DIR/report.png, the chart (matplotlib). A missing file is a scenario "not run";
unknown fields are ignored; a line that is not a JSON object is skipped and reported.
"""
import datetime
import json
import os
import platform
import statistics
import sys
import textwrap

SCENARIOS = ("s1", "s2", "s3", "s4")
TITLES = {"s1": "S1 idle", "s2": "S2 broadcast", "s3": "S3 personal", "s4": "S4 latency"}
SIDES = ("fanout", "peer")
SIDE_NAMES = {"fanout": "fanout", "peer": "socket.io peer"}
COLORS = {"fanout": "#1f77b4", "peer": "#ff7f0e"}
ORIENTATION = ("Ratios are oriented so that **> 1 means fanout is better**: peer ÷ fanout for "
               "costs and latencies (lower is better), fanout ÷ peer for rates (higher is better).")

# --- reading ------------------------------------------------------------------------------


def load(results_dir):
    """{scenario: [records] or None when its file is missing}, [problems]."""
    data, problems = {}, []
    for s in SCENARIOS:
        objects = read_objects(results_dir, s, problems)
        if objects is None:
            data[s] = None
            continue
        rows = []
        for i, obj in objects:
            if obj.get("side") not in SIDES:
                problems.append(f"{s}.jsonl line {i}: side {obj.get('side')!r} is not fanout or peer, skipped")
            else:
                rows.append(obj)
        data[s] = rows
    return data, problems


def read_objects(results_dir, scenario, problems):
    """[(line number, object)] of RESULTS_DIR/<scenario>.jsonl, None when it is missing; a
    line that is not a JSON object of this scenario is skipped and added to problems."""
    path = os.path.join(results_dir, f"{scenario}.jsonl")
    if not os.path.exists(path):
        return None
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                problems.append(f"{scenario}.jsonl line {i}: not JSON, skipped")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{scenario}.jsonl line {i}: not a JSON object, skipped")
            elif obj.get("scenario", scenario) != scenario:
                problems.append(f"{scenario}.jsonl line {i}: scenario {obj.get('scenario')!r}, skipped")
            else:
                out.append((i, obj))
    return out


def load_machine(results_dir):
    """machine.json written by all.sh, else this machine (marked as such)."""
    path = os.path.join(results_dir, "machine.json")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        if isinstance(m, dict):
            m["recorded"] = True
            return m
    except (OSError, ValueError):
        pass
    return {"cores": os.cpu_count(), "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "recorded": False}


def load_steps(results_dir):
    """steps.tsv written by all.sh: label, scenario, args, status, exit code, seconds, log."""
    steps, total = [], None
    try:
        with open(os.path.join(results_dir, "steps.tsv"), encoding="utf-8") as f:
            for line in f:
                cells = line.rstrip("\n").split("\t")
                if cells[0] == "total" and len(cells) > 1:
                    total = number(cells[1])
                elif len(cells) >= 7:
                    steps.append(dict(label=cells[0], scenario=cells[1], args=cells[2], status=cells[3],
                                      code=cells[4], seconds=number(cells[5]), log=cells[6]))
    except OSError:
        pass
    return steps, total


def number(v):
    """A finite float, or None (bools, strings, NaN and missing values are not figures)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


def get(rec, key):
    """rec[key]; key may be a path "stages.kafka.p99_ms"."""
    for part in key.split("."):
        if not isinstance(rec, dict):
            return None
        rec = rec.get(part)
    return rec


def median(recs, key, scale=1.0):
    vals = [x for x in (number(get(r, key)) for r in recs) if x is not None]
    return statistics.median(vals) * scale if vals else None


def total(recs, key):
    vals = [x for x in (number(get(r, key)) for r in recs) if x is not None]
    return sum(vals) if vals else None


def by_side(recs):
    return {side: [r for r in recs if r.get("side") == side] for side in SIDES}


def groups(recs, keys):
    """Records grouped by the values of keys, in sorted order (None sorts first)."""
    out = {}
    for r in recs:
        out.setdefault(tuple(get(r, k) for k in keys), []).append(r)
    return sorted(out.items(), key=lambda kv: tuple((v is not None, number(v) or 0, str(v)) for v in kv[0]))


def runs_of(recs):
    """Number of runs: distinct run numbers (a record without one counts alone)."""
    seen, n = set(), 0
    for r in recs:
        run = r.get("run")
        if run is None:
            n += 1
        elif run not in seen:
            seen.add(run)
            n += 1
    return n


# --- formatting -----------------------------------------------------------------------


def fmt(v, spec):
    if v is None:
        return "—"
    if spec == "int":
        return f"{v:,.0f}"
    return format(v, spec)


def ratio(f, p, better):
    """fanout's advantage, > 1 = fanout better; None when it means nothing."""
    if better is None or f is None or p is None:
        return None
    a, b = (p, f) if better == "lower" else (f, p)
    if b <= 0 or a < 0:
        return None
    return a / b


def fmt_ratio(q):
    return "—" if q is None else f"{q:.2f}×"


def count(n, one, many=None):
    return f"{n} {one if n == 1 else (many or one + 's')}"


def check(ok):
    return "—" if ok is None else ("✅" if ok else "❌")


class Table:
    """One group's table: rows of (label, fanout, peer, advantage)."""

    def __init__(self, sides):
        self.sides = sides
        self.rows = []

    def runs(self, per_side):
        cells = []
        for side in SIDES:
            n = per_side[side]
            cells.append(str(n) if n != 1 else "1 (one run, not a median)")
        self.rows.append(("runs", cells[0], cells[1], ""))

    def add(self, label, key, spec, better=None, agg="median", scale=1.0, bold=False):
        """A row of medians (agg="median") or sums over runs; returns {side: value}."""
        vals = {}
        for side in SIDES:
            rs = self.sides[side]
            vals[side] = (median(rs, key, scale) if agg == "median" else total(rs, key)) if rs else None
        q = ratio(vals["fanout"], vals["peer"], better)
        cells = [fmt(vals["fanout"], spec), fmt(vals["peer"], spec), fmt_ratio(q)]
        if bold:
            label, cells = f"**{label}**", [f"**{c}**" if c != "—" else c for c in cells]
        self.rows.append((label, *cells))
        return vals

    def markdown(self):
        out = ["| | fanout | socket.io peer | fanout's advantage (> 1: fanout better) |", "|---|---|---|---|"]
        out += [f"| {' | '.join(r)} |" for r in self.rows]
        return out


def per_run(recs, key, spec, unit=""):
    """'6.21 / 6.24 / 6.25 KiB' in run order."""
    vals = sorted(((r.get("run") if isinstance(r.get("run"), (int, float)) else 0, number(get(r, key))) for r in recs),
                  key=lambda x: x[0])
    return " / ".join(fmt(v, spec) for _, v in vals) + (f" {unit}" if unit else "")


# --- the scenarios ----------------------------------------------------------------------
# Each returns {"groups": [{"title", "table", "targets": [(target, measured, ok)], "notes": [...]}],
# "chart": what its chart panel needs}; ok is True, False or None (not measured).


def s1(recs):
    out = {"groups": [], "chart": []}
    for (nodes, conns), rs in groups(recs, ("nodes", "connections")):
        sides = by_side(rs)
        t = Table(sides)
        t.runs({s: runs_of(sides[s]) for s in SIDES})
        nodes_txt = "1 node" if nodes in (None, 1) else f"{fmt(number(nodes), 'int')} nodes"
        t.add("connected", "connected", "int")
        t.add("failed (sum over runs)", "failed", "int", agg="sum")
        t.add("RSS before connecting, MiB", "rss_before_kib", ".1f", "lower", scale=1 / 1024)
        t.add("RSS with the idle connections, MiB", "rss_after_kib", ".1f", "lower", scale=1 / 1024)
        v = t.add("RSS per idle connection, KiB", "rss_per_conn_kib", ".2f", "lower", bold=True)
        t.add("connect rate, connections/s", "connect_rate", "int", "higher")
        t.add("server CPU while connecting, ms per 1000 connections", "cpu_ms_per_1000", "int", "lower")
        f = v["fanout"]
        targets = [
            ("≤ 6 KiB per idle connection", f"{fmt(f, '.2f')} KiB", None if f is None else f <= 6),
            ("stretch: ≤ 4 KiB per idle connection", f"{fmt(f, '.2f')} KiB", None if f is None else f <= 4),
        ]
        notes = [f"Per run, RSS per connection — {SIDE_NAMES[s]}: {per_run(sides[s], 'rss_per_conn_kib', '.2f', 'KiB')}"
                 for s in SIDES if sides[s]]
        notes.append("Issue 7 measured the peer at 11.8 KiB per idle connection.")
        label = f"{fmt(number(conns), 'int')} connections, {nodes_txt}"
        out["groups"].append({"title": label, "table": t, "targets": targets, "notes": notes})
        out["chart"].append((label.replace(" connections, ", " conns\n"), v))
    return out


def s2_chosen(recs):
    """Per run: the highest rate step with sustained = true. ({side: [records]}, {side: runs without one})."""
    chosen, none = {s: [] for s in SIDES}, {s: 0 for s in SIDES}
    for side in SIDES:
        runs = {}
        for r in recs:
            if r.get("side") == side:
                runs.setdefault(r.get("run"), []).append(r)
        for steps in runs.values():
            ok = [r for r in steps if r.get("sustained") is True and number(r.get("rate")) is not None]
            if ok:
                chosen[side].append(max(ok, key=lambda r: number(r["rate"])))
            else:
                none[side] += 1
    return chosen, none


def offered(r):
    """Offered deliveries/s of a rate step: expected / seconds, else rate × connections."""
    e, s = number(r.get("expected")), number(r.get("seconds"))
    if e is not None and s:
        return e / s
    rate, c = number(r.get("rate")), number(r.get("connections"))
    return rate * c if rate is not None and c is not None else None


def s2(recs):
    out = {"groups": [], "chart": None}
    for (conns,), rs in groups(recs, ("connections",)):
        chosen, none = s2_chosen(rs)
        t = Table(chosen)
        t.runs({s: len(chosen[s]) for s in SIDES})
        if any(none.values()):
            t.rows.append(("runs without any sustained (lossless) step",
                           str(none["fanout"]), str(none["peer"]), ""))
        t.add("highest sustained rate, broadcasts/s", "rate", "int", "higher")
        d = t.add("deliveries/s at that rate", "deliveries_per_s", "int", "higher", bold=True)
        c = t.add("server CPU-s per million deliveries", "cpu_s_per_million", ".2f", "lower", bold=True)
        k = t.add("deliveries per server CPU-second", "deliveries_per_core_s", "int", "higher")
        t.add("load generator CPU-s per million deliveries", "gen_cpu_s_per_million", ".2f")
        t.add("latency p50, ms", "p50_ms", ".1f", "lower")
        t.add("latency p99, ms", "p99_ms", ".1f", "lower")
        t.add("latency p99.9, ms", "p999_ms", ".1f", "lower")
        t.add("lost at that step (sum over runs)", "lost", "int", agg="sum")
        t.add("duplicates at that step (sum over runs)", "dups", "int", agg="sum")
        t.add("connections closed at that step (sum over runs)", "dropped", "int", agg="sum")
        fc, fk = c["fanout"], k["fanout"]
        f_chosen = chosen["fanout"]
        lossless, lossless_txt = None, "—"
        if f_chosen or none["fanout"]:
            clean = sum(1 for r in f_chosen
                        if (number(r.get("lost")) or 0) == 0 and (number(r.get("dropped")) or 0) == 0)
            n_runs = len(f_chosen) + none["fanout"]
            lossless = clean == n_runs
            lossless_txt = f"{clean} of {count(n_runs, 'run')}"
        targets = [
            ("≤ 1.4 server CPU-s per million deliveries", fmt(fc, ".2f"), None if fc is None else fc <= 1.4),
            ("≥ 300,000 deliveries per server CPU-second", fmt(fk, "int"), None if fk is None else fk >= 300_000),
            ("lossless in every run (a sustained step: 0 lost, 0 closed)", lossless_txt, lossless),
        ]
        notes = [f"Per run, highest sustained step — {SIDE_NAMES[s]}: "
                 f"{per_run(chosen[s], 'deliveries_per_s', 'int', 'deliveries/s')}; "
                 f"{per_run(chosen[s], 'cpu_s_per_million', '.2f', 'CPU-s per million')}"
                 for s in SIDES if chosen[s]]
        notes.append("A run's figures are those of its highest rate step with `sustained: true`; "
                     "the table shows medians of those over runs, so each side's latencies are at its own highest "
                     "sustained load. Issue 7 measured the peer at ~14 CPU-s per million.")
        # Every rate step, for the chart: medians over runs per (side, rate).
        curve = {}
        for side in SIDES:
            pts = []
            for (rate,), steps in groups([r for r in rs if r.get("side") == side], ("rate",)):
                x = statistics.median([o for o in map(offered, steps) if o is not None] or [0]) or None
                pts.append(dict(rate=rate, offered=x, cpu=median(steps, "cpu_s_per_million"),
                                p99=median(steps, "p99_ms"),
                                sustained=all(s.get("sustained") is True for s in steps)))
            curve[side] = [p for p in pts if p["offered"] is not None]
        label = f"{fmt(number(conns), 'int')} connections"
        out["groups"].append({"title": label, "table": t, "targets": targets, "notes": notes})
        if out["chart"] is None:
            out["chart"] = dict(label=label, curve=curve, deliveries=d, cpu=c)
    return out


def s3(recs):
    out = {"groups": [], "chart": []}
    # s3 runs rate steps (scripts/bench.d/ladder.sh): one table per rate, both sides at it.
    for (users, nodes, _), rs in groups(recs, ("users", "nodes", "rate")):
        sides = by_side(rs)
        t = Table(sides)
        t.runs({s: runs_of(sides[s]) for s in SIDES})
        rate = t.add("offered rate, messages/s", "rate", "int")
        t.add("deliveries/s", "deliveries_per_s", "int", "higher")
        t.add("server CPU-s per million deliveries", "cpu_s_per_million", ".2f", "lower")
        t.add("latency p50, ms", "p50_ms", ".1f", "lower")
        p99 = t.add("latency p99, ms", "p99_ms", ".1f", "lower", bold=True)
        t.add("latency p99.9, ms", "p999_ms", ".1f", "lower")
        t.add("deliveries expected (per run)", "expected", "int")
        t.add("received (per run)", "received", "int")
        t.add("lost (sum over runs)", "lost", "int", agg="sum")
        wrong = t.add("wrong deliveries (sum over runs)", "wrong", "int", agg="sum", bold=True)
        t.add("duplicates (sum over runs)", "dups", "int", agg="sum")
        fw, fp = wrong["fanout"], p99["fanout"]
        targets = [
            ("zero wrong deliveries over all runs", fmt(fw, "int"), None if fw is None else fw == 0),
            ("p99 ≤ 20 ms", f"{fmt(fp, '.1f')} ms", None if fp is None else fp <= 20),
        ]
        notes = [f"Per run, p99 — {SIDE_NAMES[s]}: {per_run(sides[s], 'p99_ms', '.1f', 'ms')}" for s in SIDES if sides[s]]
        notes += rate_notes(sides)
        parts = [f"{fmt(number(users), 'int')} users"]
        if nodes is not None:
            parts.append(count(int(number(nodes) or 0), "node"))
        if rate_label(rate):
            parts.append(rate_label(rate) + " messages/s")
        label = ", ".join(parts)
        out["groups"].append({"title": label, "table": t, "targets": targets, "notes": notes})
        out["chart"].append((label, p99, wrong))
    return out


def rate_label(rate):
    """'1,000' when both sides ran at one rate, 'fanout 1,000 / peer 2.5' when not."""
    f, p = rate["fanout"], rate["peer"]
    r = lambda v: fmt(v, "int") if v == int(v) else f"{v:g}"  # noqa: E731
    if f is None or p is None or f == p:
        return r(f if f is not None else p) if (f, p) != (None, None) else ""
    return f"fanout {r(f)} / peer {r(p)}"


def rate_notes(sides):
    out = []
    for s in SIDES:
        rates = sorted({number(r.get("rate")) for r in sides[s]} - {None})
        if len(rates) > 1:
            out.append(f"{SIDE_NAMES[s]}'s runs were at several rates ({', '.join(fmt(r, 'int') for r in rates)}): "
                       "the medians mix them.")
    return out


STAGES = (("kafka", "Kafka → ingest"), ("bus", "bus (ingest → router)"), ("send", "node → socket"))
PCTS = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def s4(recs):
    out = {"groups": [], "chart": None}
    for (conns,), rs in groups(recs, ("connections",)):
        sides = by_side(rs)
        t = Table(sides)
        t.runs({s: runs_of(sides[s]) for s in SIDES})
        rate = t.add("rate, broadcasts/s", "rate", "g")
        t.add("latency p50, ms", "p50_ms", ".2f", "lower")
        p99 = t.add("latency p99, ms", "p99_ms", ".2f", "lower", bold=True)
        t.add("latency p99.9, ms", "p999_ms", ".2f", "lower")
        t.add("latency max, ms", "max_ms", ".2f", "lower")
        fp, pp = p99["fanout"], p99["peer"]
        q = ratio(fp, pp, "lower")
        targets = [
            ("p99 ≤ 10 ms", f"{fmt(fp, '.2f')} ms", None if fp is None else fp <= 10),
            ("p99 ≥ 3× lower than the peer's", fmt_ratio(q), None if q is None else q >= 3),
        ]
        staged = [r for r in sides["fanout"] if isinstance(r.get("stages"), dict)]
        stages = {}
        extra = []
        if staged:
            extra.append(f"fanout's latency by stage (medians of {count(runs_of(staged), 'run')}):")
            extra.append("")
            extra.append("| stage | p50, ms | p99, ms | p99.9, ms |")
            extra.append("|---|---|---|---|")
            for key, name in STAGES:
                stages[key] = {p: median(staged, f"stages.{key}.{p}") for p, _ in PCTS}
                extra.append(f"| {name} | " + " | ".join(fmt(stages[key][p], ".2f") for p, _ in PCTS) + " |")
        elif sides["fanout"]:
            extra.append("fanout's records carry no `stages`: no split by stage.")
        notes = [f"Per run, p99 — {SIDE_NAMES[s]}: {per_run(sides[s], 'p99_ms', '.2f', 'ms')}" for s in SIDES if sides[s]]
        totals = {s: {p: (median(sides[s], p) if sides[s] else None) for p, _ in PCTS} for s in SIDES}
        notes += rate_notes(sides)
        parts = [f"{fmt(number(conns), 'int')} connections"]
        if rate_label(rate):
            parts.append(rate_label(rate) + " broadcasts/s")
        label = ", ".join(parts)
        out["groups"].append({"title": label, "table": t, "targets": targets, "notes": notes, "extra": extra})
        if out["chart"] is None:
            out["chart"] = dict(label=label, totals=totals, stages=stages)
    return out


BUILDERS = {"s1": s1, "s2": s2, "s3": s3, "s4": s4}


# --- the report -------------------------------------------------------------------------


def status_of(s, recs, steps):
    """(ran, text): what happened to scenario s."""
    mine = [st for st in steps if st["scenario"] == s]
    failed = [st for st in mine if st["status"] == "failed"]
    if recs:
        text = f"ran: {count(len(recs), 'record')}"
        if failed:
            text += "; " + "; ".join(f"`{st['label']}` failed (exit {st['code']}), see {st['log']}: figures may be partial"
                                     for st in failed)
        return True, text
    if any(st["status"] == "missing" for st in mine):
        return False, f"not run: scripts/bench.d/{s}.sh does not exist in this checkout"
    if failed:
        return False, "not run to the end: " + "; ".join(
            f"`{st['label']}` failed (exit {st['code']}) before writing results, see {st['log']}" for st in failed)
    if mine:
        return False, f"ran, but wrote no results (the scenario script does not append to $BENCH_RESULTS/{s}.jsonl)"
    if recs is not None:
        return False, f"not run: {s}.jsonl holds no records"
    return False, f"not run (no {s}.jsonl)"


def commits_of(data):
    seen = []
    for s in SCENARIOS:
        for r in data[s] or []:
            c = r.get("commit")
            if c and c not in seen:
                seen.append(str(c))
    return seen


def machine_line(machine, commits):
    parts = [f"{machine.get('cores', '?')} cores"]
    if machine.get("cpu"):
        parts.append(str(machine["cpu"]))
    if machine.get("mem_gib"):
        parts.append(f"{machine['mem_gib']} GiB")
    parts.append(f"Linux {machine.get('kernel', '?')}")
    parts.append(str(machine.get("date", "?")))
    if commits:
        parts.append(("commit " if len(commits) == 1 else "commits ") + ", ".join(f"`{c}`" for c in commits))
    else:
        parts.append("commit unknown (no record names one)")
    line = "; ".join(parts)
    if machine.get("dirty"):
        line += " (the work tree had uncommitted changes)"
    if not machine.get("recorded"):
        line += " — cores, kernel and date are those of the machine that made this report (no machine.json)"
    return line


def ceiling(results_dir, problems):
    """Markdown lines for S4 from RESULTS_DIR/ceiling.jsonl (scripts/bench ceiling: bare
    sockets, no server), or [] without it: the floor under a broadcast's latency."""
    rows = [obj for _, obj in read_objects(results_dir, "ceiling", problems) or []
            if number(obj.get("writers")) is not None]
    if not rows:
        return []
    out = ["The floor on this machine (`scripts/bench ceiling`, no server: one bare 160-byte write "
           "per loopback TCP connection and its read, in one process, rounds 100 ms apart):", "",
           "| writer threads | connections | runs | round read back: p50, ms | p99, ms | writes issued by, ms "
           "| CPU per delivery: write + read, µs |", "|---|---|---|---|---|---|---|"]
    for w in sorted({int(number(r["writers"])) for r in rows}):
        rs = [r for r in rows if number(r.get("writers")) == w]
        conns = sorted({int(number(r.get("connections")) or 0) for r in rs})
        out.append(f"| {w} | {', '.join(fmt(c, 'int') for c in conns)} | {runs_of(rs)} | "
                   f"{fmt(median(rs, 'p50_ms'), '.1f')} | {fmt(median(rs, 'p99_ms'), '.1f')} | "
                   f"{fmt(median(rs, 'write_ms_p50'), '.1f')} | {fmt(median(rs, 'write_us_per_frame'), '.2f')} + "
                   f"{fmt(median(rs, 'read_us_per_frame'), '.2f')} |")
    out += ["", "A broadcast is one write per connection: its p99 can be no lower than the time this machine "
            "takes to make 99% of those writes and reads, whatever the server does."]
    return out


def build(results_dir):
    data, problems = load(results_dir)
    machine = load_machine(results_dir)
    steps, elapsed = load_steps(results_dir)
    commits = commits_of(data)
    sections = {}
    for s in SCENARIOS:
        ran, status = status_of(s, data[s], steps)
        sections[s] = dict(ran=ran, status=status, body=BUILDERS[s](data[s]) if ran else None)
    floor = ceiling(results_dir, problems)
    if floor and sections["s4"]["ran"] and sections["s4"]["body"]["groups"]:
        sections["s4"]["body"]["groups"][0]["extra"] += [""] + floor
    return dict(data=data, problems=problems, machine=machine, steps=steps, elapsed=elapsed,
                commits=commits, sections=sections)


def duration(sec):
    if sec is None:
        return "?"
    sec = int(round(sec))
    h, m = divmod(sec // 60, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {sec % 60:02d} s" if m else f"{sec} s")


def markdown(rep, results_dir):
    out = ["# fanout benchmark report (issue 7)", "",
           f"Machine: {machine_line(rep['machine'], rep['commits'])}.", "",
           f"Fanout and the socket.io peer (`../shared/peers/socketio`) on the same broker, Redis and machine, "
           f"runs alternating; figures are **medians over runs** (the number of runs is in each table). "
           + ORIENTATION, ""]
    if len(rep["commits"]) > 1:
        out += ["**The results come from more than one commit**: compare with care.", ""]
    out += ["![chart: S1–S4, fanout against the socket.io peer](report.png)", "",
            "Targets of issue 7, for fanout:", "",
            "| scenario | target | fanout | met |", "|---|---|---|---|"]
    for s in SCENARIOS:
        sec = rep["sections"][s]
        if not sec["ran"]:
            out.append(f"| {TITLES[s]} | {sec['status']} | — | — |")
            continue
        for g in sec["body"]["groups"]:
            for target, measured, ok in g["targets"]:
                out.append(f"| {TITLES[s]}, {g['title']} | {target} | {measured} | {check(ok)} |")
    out.append("")
    for s in SCENARIOS:
        sec = rep["sections"][s]
        out += [f"## {TITLES[s]}", ""]
        if not sec["ran"]:
            out += [f"**{sec['status'][:1].upper() + sec['status'][1:]}.**", ""]
            continue
        out += [f"Status: {sec['status']}.", ""]
        for g in sec["body"]["groups"]:
            out += [f"### {g['title']}", ""] + g["table"].markdown() + [""]
            out += g.get("extra", []) + ([""] if g.get("extra") else [])
            out += ["Targets (issue 7), for fanout:", ""]
            out += [f"- {check(ok)} {target}: {measured}" for target, measured, ok in g["targets"]] + [""]
            out += [n for note in g["notes"] for n in (note, "")]
    if rep["steps"]:
        out += ["## Runs", "", "`scripts/bench all`, step by step:", "",
                "| step | command | result | time | log |", "|---|---|---|---|---|"]
        for st in rep["steps"]:
            result = {"ok": "ok", "missing": "not run (no script)"}.get(st["status"], f"failed (exit {st['code']})")
            cmd = f"`scripts/bench {st['scenario']} {st['args']}`".replace(" `", "`")
            out.append(f"| {st['label']} | {cmd} | {result} | "
                       f"{duration(st['seconds']) if st['status'] != 'missing' else '—'} | "
                       f"{st['log'] if st['status'] != 'missing' else '—'} |")
        out.append("")
        if rep["elapsed"] is not None:
            out += [f"Total time of the benchmarks: {duration(rep['elapsed'])}.", ""]
    if rep["problems"]:
        out += ["## Problems reading the results", ""] + [f"- {p}" for p in rep["problems"]] + [""]
    out += [f"Made by `scripts/bench report` from `{results_dir}`, "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", ""]
    return "\n".join(out)


# --- the chart ----------------------------------------------------------------------------


def chart(rep, path):
    try:
        import matplotlib
    except ImportError:
        sys.exit("report.py: matplotlib is not importable; run it through `scripts/bench report DIR`, "
                 "which builds the venv with it")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold"})
    fig, axes = plt.subplots(2, 3, figsize=(17, 10), dpi=100)
    (a1, a2, a3), (a4, a5, a6) = axes
    secs = rep["sections"]

    def not_run(ax, s):
        ax.set_title(TITLES[s])
        ax.text(0.5, 0.5, secs[s]["status"].split(":")[0], ha="center", va="center", fontsize=13,
                color="#777", transform=ax.transAxes, wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])

    def bars(ax, labels, series, fmt_spec, width=0.38):
        """Grouped bars: series = {side: [values per label]}; values written on top."""
        xs = range(len(labels))
        for i, side in enumerate(SIDES):
            for x, v in zip(xs, series[side]):
                if v is None:
                    continue
                pos = x + (i - 0.5) * width
                ax.bar(pos, v, width, color=COLORS[side], label=SIDE_NAMES[side])
                ax.annotate(fmt(v, fmt_spec), (pos, v), ha="center", va="bottom", fontsize=9,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.6, len(labels) - 0.4)

    def log_y(ax):
        """A log y axis whose ticks are written as plain numbers, at 1, 2, 5 × 10^k."""
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def legend(ax, **kw):
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=9, **kw)

    # S1: KiB per idle connection, per group, both sides.
    if secs["s1"]["ran"]:
        groups_ = secs["s1"]["body"]["chart"]
        bars(a1, [g[0] for g in groups_], {s: [g[1][s] for g in groups_] for s in SIDES}, ".2f")
        a1.axhline(6, color="#2a2", ls="--", lw=1.2, label="target 6 KiB")
        a1.axhline(4, color="#2a2", ls=":", lw=1.2, label="stretch 4 KiB")
        a1.set_ylabel("server RSS per idle connection, KiB (lower is better)")
        a1.set_title("S1 idle:\nserver RSS per idle connection")
        a1.set_ylim(0, max([6.5] + [v * 1.45 for g in groups_ for v in g[1].values() if v]))
        legend(a1, loc="upper left", ncol=2)
    else:
        not_run(a1, "s1")

    s2_best = None
    # S2: CPU-s per million deliveries and p99 against offered deliveries/s; highest sustained.
    ch = secs["s2"]["body"]["chart"] if secs["s2"]["ran"] else None
    if ch:
        for ax, key, ylabel, target in ((a2, "cpu", "server CPU-s per million deliveries (log)", 1.4),
                                        (a3, "p99", "latency p99, ms (log)", None)):
            for side in SIDES:
                pts = [p for p in ch["curve"][side] if p[key] is not None and p[key] > 0]
                if not pts:
                    continue
                ax.plot([p["offered"] for p in pts], [p[key] for p in pts], "-", color=COLORS[side], lw=1.5,
                        label=SIDE_NAMES[side])
                for p in pts:
                    ax.plot(p["offered"], p[key], "o", ms=7, color=COLORS[side],
                            mfc=COLORS[side] if p["sustained"] else "white")
            if target:
                ax.axhline(target, color="#2a2", ls="--", lw=1.2, label=f"target {target}")
            ax.plot([], [], "o", color="#555", mfc="white", label="not sustained (lost / closed)")
            ax.set_xscale("log")
            log_y(ax)
            ax.set_xlabel("offered deliveries/s (log)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.25)
            legend(ax, loc="best")
        d, c = ch["deliveries"], ch["cpu"]
        a2.set_title(f"S2 broadcast, {ch['label']}:\nserver CPU per delivery, by offered load")
        a3.set_title(f"S2 broadcast, {ch['label']}:\nlatency p99, by offered load")
        best = [f"{SIDE_NAMES[s]} {fmt(d[s], 'int')}/s at {fmt(c[s], '.2f')} CPU-s per million"
                for s in SIDES if d[s] is not None]
        s2_best = "S2 highest sustained deliveries/s (medians):\n" + "\n".join("  " + b for b in best or ["none"])
    else:
        not_run(a2, "s2")
        not_run(a3, "s2")

    # S3: p99 per group, wrong deliveries written under the bars.
    if secs["s3"]["ran"]:
        groups_ = secs["s3"]["body"]["chart"]
        # Groups differ by rate (one per step): the rate names a bar pair, the rest the title.
        heads = {g[0].rsplit(", ", 1)[0] for g in groups_}
        by_rate = len(groups_) > 1 and len(heads) == 1 and all(g[0].endswith(" messages/s") for g in groups_)
        short = (lambda label: label.rsplit(", ", 1)[1].replace(" messages/s", "/s")) if by_rate \
            else (lambda label: label.replace(", ", "\n", 1))
        labels = [short(g[0]) + "\nwrong\n" + " / ".join(fmt(g[2][s], "int") for s in SIDES) for g in groups_]
        bars(a4, labels, {s: [g[1][s] for g in groups_] for s in SIDES}, ".0f" if by_rate else ".1f")
        for t in a4.texts:
            t.set_fontsize(7)
        a4.tick_params(axis="x", labelsize=8)
        a4.axhline(20, color="#2a2", ls="--", lw=1.2, label="target p99 20 ms")
        log_y(a4)
        vals = [v for g in groups_ for v in g[1].values() if v and v > 0]
        a4.set_ylim(min(vals + [20]) / 2, max(vals + [20]) * 4)
        a4.set_ylabel("latency p99, ms (log; lower is better)")
        a4.set_title(f"S3 personal{', ' + heads.pop() if by_rate else ''}:\n"
                     "latency p99 by rate, and wrong deliveries (fanout / peer)")
        legend(a4, loc="upper left", ncol=3)
    else:
        not_run(a4, "s3")

    # S4: p50 / p99 / p99.9 per side, and fanout's stages.
    ch = secs["s4"]["body"]["chart"] if secs["s4"]["ran"] else None
    if ch:
        cats = [(SIDE_NAMES[s], ch["totals"][s]) for s in SIDES if any(ch["totals"][s].values())]
        cats += [(f"fanout:\n{name}", ch["stages"][k]) for k, name in STAGES if k in ch["stages"]]
        width = 0.26
        shades = {"p50_ms": 0.45, "p99_ms": 0.75, "p999_ms": 1.0}
        for i, (p, pname) in enumerate(PCTS):
            for x, (cat, vals) in enumerate(cats):
                v = vals.get(p)
                if v is None or v <= 0:
                    continue
                base = COLORS["peer"] if cat == SIDE_NAMES["peer"] else COLORS["fanout"]
                pos = x + (i - 1) * width
                a5.bar(pos, v, width, color=base, alpha=shades[p], edgecolor="#333", lw=0.5)
                a5.annotate(fmt(v, ".1f" if v >= 10 else ".2f"), (pos, v), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 2), textcoords="offset points")
        from matplotlib.patches import Patch
        handles = [Patch(facecolor="#555", alpha=shades[p], edgecolor="#333", label=pname) for p, pname in PCTS]
        handles.append(a5.axhline(10, color="#2a2", ls="--", lw=1.2, label="target p99 10 ms"))
        a5.set_xticks(range(len(cats)))
        a5.set_xticklabels([c.replace(" (", "\n(") for c, _ in cats], fontsize=8)
        log_y(a5)
        tops = [v for _, vals in cats for v in vals.values() if v and v > 0]
        if tops:
            a5.set_ylim(min(tops) / 1.6, max(tops + [10]) * 3)
        a5.set_ylabel("produce → client latency, ms (log)")
        a5.set_title(f"S4 latency, {ch['label']}:\np50 / p99 / p99.9, fanout's by stage")
        a5.grid(True, axis="y", which="both", alpha=0.25)
        a5.legend(handles=handles, fontsize=9, loc="upper right")
    else:
        not_run(a5, "s4")

    # The sixth panel: the summary of targets, as text.
    a6.axis("off")
    lines = []
    for s in SCENARIOS:
        sec = secs[s]
        if not sec["ran"]:
            lines.append(f"{TITLES[s]}: {sec['status'].split(':')[0]}")
            continue
        for g in sec["body"]["groups"]:
            lines.append(f"{TITLES[s]}, {g['title']}")
            for target, measured, ok in g["targets"]:
                mark = {True: "met    ", False: "NOT met", None: "n/a    "}[ok]
                lines += textwrap.wrap(f"{mark} {target}: {measured}", 66, initial_indent="  ",
                                       subsequent_indent=" " * 11)
    if s2_best:
        lines += ["", s2_best]
    # 8.5 pt fits ~34 lines in the panel; more (an S3 ladder of many steps) get a smaller font.
    size = 8.5 if len(lines) <= 32 else max(5.0, 8.5 * 32 / len(lines))
    a6.text(-0.05, 1.05, "Targets of issue 7, for fanout\n\n" + "\n".join(lines), va="top", ha="left", fontsize=size,
            family="monospace", transform=a6.transAxes)

    m = rep["machine"]
    commits = ", ".join(rep["commits"]) or "unknown"
    fig.suptitle(f"fanout vs socket.io peer — issue 7 benchmarks — medians over runs — "
                 f"{m.get('cores', '?')} cores, Linux {m.get('kernel', '?')}, {m.get('date', '?')}, commit {commits}",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        return 2
    results_dir = argv[1]
    out_dir = argv[2] if len(argv) == 3 else results_dir
    if not os.path.isdir(results_dir):
        sys.stderr.write(f"report.py: {results_dir} is not a directory\n")
        return 1
    os.makedirs(out_dir, exist_ok=True)
    rep = build(results_dir)
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(rep, results_dir))
    chart(rep, os.path.join(out_dir, "report.png"))
    ran = [s for s in SCENARIOS if rep["sections"][s]["ran"]]
    print(f"==> report: {md} and report.png ({', '.join(ran) or 'no scenario'} with results"
          + (f"; not run: {', '.join(s for s in SCENARIOS if s not in ran)}" if len(ran) < len(SCENARIOS) else "")
          + ")")
    for p in rep["problems"]:
        print(f"    warning: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
