# scripts/bench s3 [runs] [users] [nodes]: personal messages (issue 7, S3). Each of `users`
# users (default 20000, over 2 nodes of each side: one process may hold 20,000 files) has one
# connection; odd users switched robot.reply off (fanout: rows in its preference table;
# the peer: mute=robot.reply in the query). Record k is for user k mod users. Rate steps
# (BENCH_RATES records/s, BENCH_STEP seconds each) until one is not sustained. Wrong
# deliveries (a muted user or another user getting a message) must be zero. The publisher
# batches for BENCH_LINGER_MS (librdkafka linger.ms, one value for every step; default: 2 ms
# below 2000 records/s, 10 ms from there). Chosen on tansu, whose cost is per produce request
# (records in small batches fell seconds behind: at 2000/s with 2 ms, at 10000/s with 5 ms),
# and kept for Apache Kafka 4.4, where small batches fall behind too on these 2 cores (the
# JVM shares them with both nodes, Redis and the generators; fanout only, one run each,
# 2026-12-03, docs/bench/s3-apache-kafka-2026-12-03): with 0 ms the `kafka` stage was
# 1.6-3.3 s late at p50 from 5000/s on (5 s steps, a niced test run sharing the machine),
# with 2 ms 0.24 s at p50 and 2.1 s at p99 at 20000/s, with 5 ms p99 9-13 ms at 5000 and
# 10000/s but 99 ms at 20000/s, against 14.5-17 ms (medians of 3) with 10 ms from 2000 to
# 20000/s. The linger is part of the measured produce -> client latency: from 2000/s it is
# most of fanout's p99.
runs=${1:-${BENCH_RUNS:-3}} users=${2:-20000} nodes=${3:-2}
rates=${BENCH_RATES:-200 500 1000 2000 5000 10000 20000}
linger_for() { if [ -n "${BENCH_LINGER_MS:-}" ]; then echo "$BENCH_LINGER_MS"; elif [ "$1" -lt 2000 ]; then echo 2; else echo 10; fi; }
seconds=${BENCH_STEP:-10}
sides=${BENCH_SIDES:-fanout peer}
source scripts/bench.d/ladder.sh
step_targets=users:$users
echo "==> S3 personal: $users users over $nodes nodes, odd users muted, steps of $seconds s at $rates records/s (linger ${BENCH_LINGER_MS:-2/10} ms), $runs runs per side"
before_clients() {
  [ "$1" != peer ] || return 0
  psql "$cluster_db" -qc "DELETE FROM fanout_preferences;
    INSERT INTO fanout_preferences (user_id, msg_type, enabled)
    SELECT 'u' || i, 'robot.reply', false FROM generate_series(1, $users - 1, 2) i" >/dev/null
}
run_steps() {
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
