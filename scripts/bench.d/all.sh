# scripts/bench all [runs]: every scenario of issue 7 and the ceiling, then the report; see
# docs/benchmarks.md, "Running everything". Each scenario is a child `scripts/bench <scenario> ...` with
# BENCH_RESULTS set to one fresh results directory (BENCH_OUT, default
# target/bench/<UTC date and time>-<commit>/) and BENCH_RUNS=runs; its console output is also
# in <dir>/<step>.log. A scenario whose script is not there is skipped and the report says so.
runs=${1:-3}
case $runs in
  "" | *[!0-9]* | 0) echo "usage: scripts/bench all [runs]   (runs per side: a positive integer, default 3)" >&2; exit 2 ;;
esac
# The steps, in order: label (names the log), scenario, its arguments.
steps=(
  "s1-1node s1 19000 $runs"
  "s1-3nodes s1 50000 $runs 3"
  "s2 s2"
  "s3 s3"
  "s4 s4"
  "ceiling ceiling $runs"
)

started=$SECONDS
commit=$(git rev-parse --short HEAD)
if [ -n "${BENCH_OUT:-}" ]; then
  case $BENCH_OUT in /*) out=$BENCH_OUT ;; *) out=${OLDPWD:-$PWD}/$BENCH_OUT ;; esac
else
  out=$PWD/target/bench/$(date -u +%Y%m%d-%H%M%S)-$commit
fi
if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "$out is not empty: each 'scripts/bench all' writes into a fresh directory (set BENCH_OUT to another)" >&2
  exit 1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The report's venv first: better to fail now than after the benchmarks.
./scripts/bench report --venv

dirty=false
[ -z "$(git status --porcelain --untracked-files=no)" ] || dirty=true
python3 - "$out/machine.json" "$commit" "$dirty" "$runs" <<'PY'
import datetime, json, os, platform, sys
path, commit, dirty, runs = sys.argv[1], sys.argv[2], sys.argv[3] == "true", int(sys.argv[4])
cpu = mem = None
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    pass
try:
    kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    mem = round(kib / 1024 / 1024)
except (OSError, StopIteration, ValueError):
    pass
now = datetime.datetime.now(datetime.timezone.utc)
json.dump({"cores": os.cpu_count(), "cpu": cpu, "mem_gib": mem, "kernel": platform.release(),
           "date": now.strftime("%Y-%m-%d"), "started": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "commit": commit, "dirty": dirty, "runs": runs}, open(path, "w"))
PY
echo "==> scripts/bench all: $runs runs per side; results, logs and report in $out"
[ "$dirty" = false ] || echo "    (the work tree has uncommitted changes: the report says so)"

export BENCH_RESULTS=$out BENCH_RUNS=$runs
failed=0
for step in "${steps[@]}"; do
  read -r label scenario args <<<"$step"
  if [ ! -f "scripts/bench.d/$scenario.sh" ]; then
    echo "==> [$label] not run: scripts/bench.d/$scenario.sh does not exist"
    printf '%s\t%s\t%s\tmissing\t\t0\t\n' "$label" "$scenario" "$args" >>"$out/steps.tsv"
    continue
  fi
  echo "==> [$label] scripts/bench $scenario${args:+ $args} ($(date -u +%H:%M:%S) UTC; log $out/$label.log)"
  t0=$SECONDS
  set +e
  # shellcheck disable=SC2086 # $args is a list of words
  ./scripts/bench "$scenario" $args 2>&1 | tee "$out/$label.log"
  code=${PIPESTATUS[0]}
  set -e
  status=ok
  if [ "$code" != 0 ]; then
    status=failed failed=$((failed + 1))
    echo "==> [$label] FAILED (exit $code); going on with the next scenario"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$scenario" "$args" "$status" "$code" "$((SECONDS - t0))" \
    "$label.log" >>"$out/steps.tsv"
done
elapsed=$((SECONDS - started))
printf 'total\t%s\n' "$elapsed" >>"$out/steps.tsv"

report_code=0
./scripts/bench report "$out" || report_code=$?
printf -v took '%d h %02d min %02d s' $((elapsed / 3600)) $((elapsed % 3600 / 60)) $((elapsed % 60))
echo "==> scripts/bench all: $took in all (benchmarks; the report after them takes seconds)"
echo "    report: $out/report.md, $out/report.png"
[ "$failed" = 0 ] || echo "    $failed step(s) failed: see their logs in $out"
[ "$report_code" = 0 ] || { echo "    the report failed (exit $report_code)" >&2; exit "$report_code"; }
[ "$failed" = 0 ]
