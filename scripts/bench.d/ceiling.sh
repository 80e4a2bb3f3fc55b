# scripts/bench ceiling [runs] [connections]: the floor under a broadcast's latency on this
# machine (examples/ceiling.rs): one bare 160-byte write per loopback TCP connection (default
# 9500: both ends in one process) and its read, with 1 and 2 writer threads, rounds 100 ms
# apart. Prints the medians over runs; BENCH_RESULTS=DIR appends each run to DIR/ceiling.jsonl.
runs=${1:-${BENCH_RUNS:-3}} n=${2:-9500}
build ceiling
echo "==> ceiling: $n connections, one frame each per round, $runs runs per writer count"
for r in $(seq 1 "$runs"); do
  for writers in 1 2; do
    out=$("$examples/ceiling" --connections "$n" --writers "$writers")
    result ceiling bare "$r" "$out"
    echo "    run $r, $writers writer(s): $out"
  done
done
python3 - "$work/ceiling.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for w in sorted({r["writers"] for r in rows}):
    rs = [r for r in rows if r["writers"] == w]
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"==> {w} writer(s), medians of {len(rs)}: a round to {rs[0]['connections']} connections read back at"
          f" p50/p99 {med('p50_ms'):.2f}/{med('p99_ms'):.2f} ms (writes issued by {med('write_ms_p50'):.2f} ms);"
          f" CPU per frame: write {med('write_us_per_frame'):.2f} us + read {med('read_us_per_frame'):.2f} us"
          f" = {med('cpu_us_per_frame'):.2f} us")
PY
echo "(machine: $(machine_line))"
