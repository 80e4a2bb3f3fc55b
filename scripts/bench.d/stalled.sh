# scripts/bench stalled [clients] [stalled-percent] [messages] [payload-bytes] [rate-per-sec]
# Some clients stop reading; see docs/benchmarks.md, "Stalled clients".
clients=${1:-2000} stalled=${2:-5} messages=${3:-2000} payload=${4:-100} rate=${5:-200}
queue_bytes=${BENCH_QUEUE_MAX_BYTES:-65536} queue_messages=${BENCH_QUEUE_MAX_MESSAGES:-1024}
build stalled_clients
# One fresh embedded-default node per run, so each run's RSS and close counters start at zero.
run() {
  local pct=$1 dir="$work/run-$1" status=0
  start_fanout "$dir" FANOUT__SERVER__QUEUE_MAX_BYTES="$queue_bytes" FANOUT__SERVER__QUEUE_MAX_MESSAGES="$queue_messages"
  echo "==> $pct% stalled (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$examples/stalled_clients" "ws://$node_public/ws" "http://$node_public/v1/publish" \
    "http://$node_admin" "$node_pid" "$clients" "$pct" "$messages" "$payload" "$rate" || status=$?
  kill "$node_pid" 2>/dev/null || true
  wait "$node_pid" 2>/dev/null || true
  [ "$status" = 0 ] || { echo "stalled_clients failed ($status); node log:" >&2; tail -20 "$dir/server.log" >&2; exit 1; }
}
echo "(node: embedded default, server.queue_max_bytes=$queue_bytes, server.queue_max_messages=$queue_messages)"
run 0
run "$stalled"
echo "(machine: $(machine_line))"
