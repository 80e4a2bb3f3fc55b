# scripts/bench s3 [runs] [users] [nodes]: personal messages (issue 7, S3). Each of `users`
# users (default 20000, over 2 nodes of each side: one process may hold 20,000 files) has one
# connection; odd users switched robot.reply off (fanout: rows in its preference table;
# the peer: mute=robot.reply in the query). Record k is for user k mod users. Rate steps
# (BENCH_RATES records/s, BENCH_STEP seconds each) until one is not sustained. Wrong
# deliveries (a muted user or another user getting a message) must be zero. The publisher
# batches for BENCH_LINGER_MS (librdkafka linger.ms; default: 2 ms below 2000 records/s, 10
# ms from there): tansu's cost is per produce request, and records sent in small batches fall
# behind in the broker (seconds late at 2000/s with 2 ms, at 10000/s with 5 ms), so the step
# would measure the broker.
runs=${1:-${BENCH_RUNS:-3}} users=${2:-20000} nodes=${3:-2}
rates=${BENCH_RATES:-200 500 1000 2000 5000 10000 20000}
linger_for() { if [ -n "${BENCH_LINGER_MS:-}" ]; then echo "$BENCH_LINGER_MS"; elif [ "$1" -lt 2000 ]; then echo 2; else echo 10; fi; }
seconds=${BENCH_STEP:-10}
sides=${BENCH_SIDES:-fanout peer}
source scripts/bench.d/ladder.sh
step_targets=users:$users
echo "==> S3 personal: $users users over $nodes nodes, odd users muted, steps of $seconds s at $rates records/s (linger ${BENCH_LINGER_MS:-2/10} ms), $runs runs per side"
before_clients() {
  [ "$1" = fanout ] || return 0
  psql "$shared_db" -qc "DELETE FROM fanout_preferences;
    INSERT INTO fanout_preferences (user_id, msg_type, enabled)
    SELECT 'u' || i, 'robot.reply', false FROM generate_series(1, $users - 1, 2) i" >/dev/null
}
# Supplementary (not committed): before the first step, wait until the servers are idle
# (under 20% of a core together over 2 s; 120 s at most): the peer is busy for ~20-30 s
# after its 20,000 clients connected, and its first step measured that.
settle() {
  local c0 c1 t=0
  while [ $t -lt 120 ]; do
    c0=$(sum_cpu_ms "${cluster_pids[@]}"); sleep 2; c1=$(sum_cpu_ms "${cluster_pids[@]}"); t=$((t + 2))
    [ $((c1 - c0)) -lt 400 ] && break
  done
  echo "    (settled after $t s: servers used $((c1 - c0)) CPU-ms in the last 2 s)"
}
run_steps() {
  settle "$1"
  local rate linger
  for rate in $rates; do
    linger=$(linger_for "$rate")
    step "$rate" "$seconds" --to users --users "$users" --linger-ms "$linger"
    record s3 "$1" "$2" "{\"users\":$users,\"nodes\":$nodes,\"linger_ms\":$linger}"
    sustained || break
  done
}
alternate s3 "$nodes" "$users" --mute-odd robot.reply
python3 scripts/bench.d/summary.py s3 "$work/s3.jsonl"
echo "(machine: $(machine_line))"
