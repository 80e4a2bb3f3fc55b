#!/usr/bin/env python3
"""Unit tests of report.py on made-up results written to a temporary directory.

    python3 scripts/bench.d/report_test.py            # the tests (the chart ones need matplotlib)
    python3 scripts/bench.d/report_test.py --sample DIR   # write the sample results into DIR, to look at

`scripts/bench report --test` runs them in the bench venv. The sample is invented data for
these tests only: it is never a result and is never committed.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, HERE)
import report  # noqa: E402

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

COMMIT = "sample0"


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def sample(d, scenarios=("s1", "s2", "s3", "s4")):
    """Invented results in the schema of RESULTS.md: 3 runs per side, alternating."""
    if "s1" in scenarios:
        recs = []
        for nodes, n, f_per, p_per in ((1, 19000, (6.21, 5.9, 6.25), (11.6, 11.9, 12.1)),
                                       (3, 50000, (6.5, 6.4, 6.6), (12.0, 12.2, 11.8))):
            for run in (1, 2, 3):
                for side, per, rate, base in (("fanout", f_per, 7000 + run * 10, 20480),
                                              ("peer", p_per, 1800 + run * 10, 95000)):
                    recs.append(dict(scenario="s1", side=side, run=run, nodes=nodes, connections=n, connected=n,
                                     failed=0, rss_before_kib=base * nodes, rss_after_kib=base * nodes + per[run - 1] * n,
                                     rss_per_conn_kib=per[run - 1], connect_rate=rate,
                                     cpu_ms_per_1000=163 if side == "fanout" else 426, commit=COMMIT,
                                     an_unknown_field={"ignored": True}))
        write_jsonl(os.path.join(d, "s1.jsonl"), recs, extra_lines=["", "{not json"])
    if "s2" in scenarios:
        recs = []
        for run in (1, 2, 3):
            # fanout sustains up to 100 broadcasts/s (1M deliveries/s), the peer up to 10.
            for side, top, cpu in (("fanout", 100, 1.1), ("peer", 10, 14.0)):
                for rate in (1, 3, 10, 30, 100, 300):
                    sustained = rate <= top
                    expected = 10000 * rate * 10
                    lost = 0 if sustained else expected // 10
                    received = expected - lost
                    c = cpu * (1 + 0.02 * run) * (1 if sustained else 1.3)
                    recs.append(dict(scenario="s2", side=side, run=run, connections=10000, rate=rate, seconds=10,
                                     messages=rate * 10, expected=expected, received=received, lost=lost, dups=0,
                                     dropped=0 if sustained else 50, deliveries_per_s=received / 10,
                                     server_cpu_s=c * received / 1e6, cpu_s_per_million=c,
                                     deliveries_per_core_s=1e6 / c, gen_cpu_s_per_million=2.0,
                                     p50_ms=2 + rate / 50 if side == "fanout" else 20 + rate,
                                     p99_ms=5 + rate / 20 if side == "fanout" else 60 + 3 * rate,
                                     p999_ms=9 + rate / 10 if side == "fanout" else 90 + 5 * rate,
                                     max_ms=30.0, sustained=sustained, commit=COMMIT))
        write_jsonl(os.path.join(d, "s2.jsonl"), recs)
    if "s3" in scenarios:
        recs = []
        for run in (1, 2, 3):
            for side, p99, wrong in (("fanout", 8.0 + run, 0), ("peer", 45.0 + run, 0)):
                recs.append(dict(scenario="s3", side=side, run=run, users=20000, nodes=2, rate=1000, messages=10000,
                                 expected=5000, received=5000, lost=0, wrong=wrong, dups=0, deliveries_per_s=500,
                                 cpu_s_per_million=3.0 if side == "fanout" else 25.0, p50_ms=p99 / 4, p99_ms=p99,
                                 p999_ms=p99 * 1.5, commit=COMMIT))
        write_jsonl(os.path.join(d, "s3.jsonl"), recs)
    if "s4" in scenarios:
        recs = []
        for run in (1, 2, 3):
            for side, p50, p99 in (("fanout", 1.2, 4.0 + run / 10), ("peer", 9.0, 30.0 + run)):
                r = dict(scenario="s4", side=side, run=run, connections=10000, rate=50, p50_ms=p50, p99_ms=p99,
                         p999_ms=p99 * 2, max_ms=p99 * 4, commit=COMMIT)
                if side == "fanout":
                    r["stages"] = {"kafka": {"p50_ms": 0.4, "p99_ms": 1.5, "p999_ms": 3.0},
                                   "bus": {"p50_ms": 0.3, "p99_ms": 1.0, "p999_ms": 2.0},
                                   "send": {"p50_ms": 0.5, "p99_ms": 2.0, "p999_ms": 4.0}}
                recs.append(r)
        write_jsonl(os.path.join(d, "s4.jsonl"), recs)
    with open(os.path.join(d, "machine.json"), "w") as f:
        json.dump({"cores": 2, "kernel": "6.18.0-test", "date": "2026-11-24", "commit": COMMIT, "dirty": False,
                   "cpu": "Sample CPU", "mem_gib": 24}, f)


def section(md, title):
    """The text of one '## title' section."""
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else len(md)]


def row(md, label):
    for line in md.splitlines():
        if line.startswith("| ") and line.split(" | ")[0].strip("| *") == label:
            return [c.strip().strip("*") for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r}")


class ReportTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def md(self, **kw):
        sample(self.dir, **kw)
        return report.markdown(report.build(self.dir), self.dir)

    def test_s1_medians_ratio_and_targets(self):
        s = section(self.md(), "S1 idle")
        self.assertIn("### 19,000 connections, 1 node", s)
        self.assertIn("### 50,000 connections, 3 nodes", s)
        one = s[:s.index("### 50,000")]
        # medians: fanout 6.21, peer 11.90; lower is better, so the advantage is 11.90 / 6.21.
        self.assertEqual(row(one, "RSS per idle connection, KiB"), ["RSS per idle connection, KiB", "6.21", "11.90", "1.92×"])
        # connect rate: higher is better, fanout / peer = 7020 / 1820.
        self.assertEqual(row(one, "connect rate, connections/s")[3], f"{7020 / 1820:.2f}×")
        self.assertEqual(row(one, "runs")[1:3], ["3", "3"])
        self.assertIn("- ❌ ≤ 6 KiB per idle connection: 6.21 KiB", one)
        self.assertIn("- ❌ stretch: ≤ 4 KiB per idle connection: 6.21 KiB", one)

    def test_s2_highest_sustained_step_per_run(self):
        s = section(self.md(), "S2 broadcast")
        self.assertEqual(row(s, "highest sustained rate, broadcasts/s")[1:3], ["100", "10"])
        self.assertEqual(row(s, "deliveries/s at that rate")[1:4], ["1,000,000", "100,000", "10.00×"])
        # CPU-s per million: medians of 1.1 × (1.02, 1.04, 1.06) and 14 × (...): 1.144 and 14.56.
        self.assertEqual(row(s, "server CPU-s per million deliveries")[1:4], ["1.14", "14.56", f"{14.56 / 1.144:.2f}×"])
        self.assertEqual(row(s, "lost at that step (sum over runs)")[1:3], ["0", "0"])
        self.assertIn("- ✅ ≤ 1.4 server CPU-s per million deliveries: 1.14", s)
        self.assertIn("- ✅ ≥ 300,000 deliveries per server CPU-second: 874,126", s)
        self.assertIn("- ✅ lossless in every run (a sustained step: 0 lost, 0 closed): 3 of 3 runs", s)

    def test_s2_run_without_sustained_step(self):
        sample(self.dir, scenarios=("s2",))
        path = os.path.join(self.dir, "s2.jsonl")
        recs = read_jsonl(path)
        for r in recs:
            if r["side"] == "fanout" and r["run"] == 2:
                r["sustained"] = False
        write_jsonl(path, recs)
        s = section(report.markdown(report.build(self.dir), self.dir), "S2 broadcast")
        self.assertEqual(row(s, "runs")[1:3], ["2", "3"])
        self.assertEqual(row(s, "runs without any sustained (lossless) step")[1:3], ["1", "0"])
        self.assertIn("- ❌ lossless in every run (a sustained step: 0 lost, 0 closed): 2 of 3 runs", s)

    def test_s3_wrong_deliveries_fail_the_target(self):
        sample(self.dir, scenarios=("s3",))
        path = os.path.join(self.dir, "s3.jsonl")
        recs = read_jsonl(path)
        recs[0]["wrong"] = 2  # fanout, run 1
        write_jsonl(path, recs)
        s = section(report.markdown(report.build(self.dir), self.dir), "S3 personal")
        self.assertEqual(row(s, "wrong deliveries (sum over runs)")[1:3], ["2", "0"])
        self.assertIn("- ❌ zero wrong deliveries over all runs: 2", s)
        self.assertIn("- ✅ p99 ≤ 20 ms: 10.0 ms", s)

    def test_s4_targets_and_stages(self):
        s = section(self.md(), "S4 latency")
        self.assertEqual(row(s, "latency p99, ms")[1:4], ["4.20", "32.00", f"{32 / 4.2:.2f}×"])
        self.assertIn("| Kafka → ingest | 0.40 | 1.50 | 3.00 |", s)
        self.assertIn("| node → socket | 0.50 | 2.00 | 4.00 |", s)
        self.assertIn("- ✅ p99 ≤ 10 ms: 4.20 ms", s)
        self.assertIn("- ✅ p99 ≥ 3× lower than the peer's: 7.62×", s)

    def test_s4_shows_the_ceiling_when_measured(self):
        self.assertNotIn("The floor on this machine", section(self.md(), "S4 latency"))
        rows = [dict(scenario="ceiling", side="bare", run=run, connections=9500, writers=w, p50_ms=20.0 + run,
                     p99_ms=60.0 + run, write_ms_p50=45.0, write_us_per_frame=5.0 + w, read_us_per_frame=5.25)
                for run in (1, 2, 3) for w in (1, 2)]
        write_jsonl(os.path.join(self.dir, "ceiling.jsonl"), rows)
        s = section(report.markdown(report.build(self.dir), self.dir), "S4 latency")
        self.assertIn("The floor on this machine", s)
        self.assertIn("| 1 | 9,500 | 3 | 22.0 | 62.0 | 45.0 | 6.00 + 5.25 |", s)
        self.assertIn("| 2 | 9,500 | 3 | 22.0 | 62.0 | 45.0 | 7.00 + 5.25 |", s)

    def test_missing_scenarios_say_not_run(self):
        md = self.md(scenarios=("s1",))
        for title in ("S2 broadcast", "S3 personal", "S4 latency"):
            self.assertIn("**Not run (no s", section(md, title))
        self.assertIn("| S2 broadcast | not run (no s2.jsonl) | — | — |", md)
        self.assertIn("| S1 idle, 19,000 connections, 1 node | ≤ 6 KiB per idle connection | 6.21 KiB | ❌ |", md)

    def test_steps_tsv_explains_why(self):
        sample(self.dir, scenarios=("s1",))
        with open(os.path.join(self.dir, "steps.tsv"), "w") as f:
            f.write("s1-1node\ts1\t19000 3\tok\t0\t600\ts1-1node.log\n")
            f.write("s2\ts2\t\tmissing\t\t0\t\n")
            f.write("s3\ts3\t\tfailed\t1\t12\ts3.log\n")
            f.write("s4\ts4\t\tok\t0\t30\ts4.log\n")
            f.write("total\t700\n")
        md = report.markdown(report.build(self.dir), self.dir)
        self.assertIn("not run: scripts/bench.d/s2.sh does not exist in this checkout", md)
        self.assertIn("`s3` failed (exit 1) before writing results, see s3.log", md)
        self.assertIn("Ran, but wrote no results", section(md, "S4 latency"))
        self.assertIn("Total time of the benchmarks: 11 min 40 s.", md)

    def test_machine_line_and_bad_lines(self):
        md = self.md()
        self.assertIn("Machine: 2 cores; Sample CPU; 24 GiB; Linux 6.18.0-test; 2026-11-24; commit `sample0`.", md)
        self.assertIn("s1.jsonl line 14: not JSON, skipped", md)
        self.assertIn("> 1 means fanout is better", md)

    def test_commit_comes_from_the_results(self):
        sample(self.dir, scenarios=("s4",))
        os.remove(os.path.join(self.dir, "machine.json"))
        rep = report.build(self.dir)
        self.assertEqual(rep["commits"], [COMMIT])
        self.assertIn("no machine.json", report.markdown(rep, self.dir))

    @unittest.skipUnless(HAVE_MPL, "matplotlib is not installed (scripts/bench report --test runs this in the venv)")
    def test_cli_writes_markdown_and_png(self):
        sample(self.dir)
        out = os.path.join(self.dir, "out")
        run = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), self.dir, out],
                             capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        with open(os.path.join(out, "report.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        with open(os.path.join(out, "report.md")) as f:
            self.assertIn("](report.png)", f.read())

    @unittest.skipUnless(HAVE_MPL, "matplotlib is not installed")
    def test_chart_with_nothing_run(self):
        report.chart(report.build(self.dir), os.path.join(self.dir, "empty.png"))
        self.assertTrue(os.path.getsize(os.path.join(self.dir, "empty.png")) > 1000)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sample":
        os.makedirs(sys.argv[2], exist_ok=True)
        sample(sys.argv[2])
        print(f"sample results (invented, for tests only) written to {sys.argv[2]}")
    else:
        unittest.main()
