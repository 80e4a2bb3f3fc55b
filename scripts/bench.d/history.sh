# scripts/bench history [users] [record-bytes] [runs]: what one record to many users costs
# the Redis history (issue 15, item 4). A release node (Kafka, a private redis-server on a
# free port so that nothing else moves its figures, SQLite) takes [runs] (3) records of
# about [record-bytes] (102400) to [users] (1000) users each, sent with POST /v1/publish
# (so through Kafka and ingest like any record), each to users with no history yet. Per
# record: Redis `used_memory` before and after (INFO memory, 2 s after the record was
# published, so client buffers are back), the MEMORY USAGE (SAMPLES 0) of the node's keys,
# and the publish script call's time from Redis's SLOWLOG (the longest EVALSHA of that
# record; the private server logs every command). BENCH_FANOUT_BIN=<another build> measures
# that build instead (scripts/bench.d/harness.sh).
users=${1:-1000}
record_bytes=${2:-102400}
runs=${3:-3}
need_kafka
[ -n "${BENCH_FANOUT_BIN:-}" ] || build

private_redis --slowlog-log-slower-than 0 --slowlog-max-len 1024
port=$private_redis_port
rcli() { redis-cli -p "$port" "$@"; }

topic=bench-history-$RANDOM$RANDOM
prefix=$topic
new_topic "$topic" 1
cat >"$work/types.toml" <<'TOML'
[[types]]
name = "bench.big"
TOML
node_config=$work/types.toml
start_fanout "$work/node" FANOUT__KAFKA__BROKERS="$kafka" FANOUT__KAFKA__TOPICS="$topic" \
  FANOUT__KAFKA__GROUP_ID="$topic" FANOUT__REDIS__URL="redis://127.0.0.1:$port" \
  FANOUT__REDIS__PREFIX="$prefix" FANOUT__DATABASE__URL="sqlite://$work/node/fanout.db" \
  FANOUT__AUTH__JWT_SECRET=bench-secret FANOUT__AUTH__ADMIN_TOKEN=bench-admin
echo "==> $runs records of ~$record_bytes bytes to $users users each ($("$bin" --version 2>/dev/null || echo fanout); $(rcli info server | tr -d '\r' | grep -m1 redis_version))"

used_memory() { rcli info memory | tr -d '\r' | awk -F: '$1 == "used_memory" {print $2}'; }
keys_bytes() {
  rcli --scan --pattern "$prefix:*" | awk '{print "MEMORY USAGE " $0 " SAMPLES 0"}' | rcli \
    | awk '{s += $1} END {print s + 0}'
}

for run in $(seq 1 "$runs"); do
  python3 - "$users" "$record_bytes" "$run" >"$work/record.json" <<'PY'
import json, sys
users, size, run = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
env = {"type": "bench.big", "to": {"users": [f"r{run}-user-{i}" for i in range(users)]},
       "data": {"pad": ""}}
env["data"]["pad"] = "x" * max(0, size - len(json.dumps(env, separators=(",", ":"))))
print(json.dumps(env, separators=(",", ":")), end="")
PY
  sleep 2
  before=$(used_memory) keys_before=$(keys_bytes)
  rcli slowlog reset >/dev/null
  code=$(curl -s -o "$work/publish.out" -w '%{http_code}' -X POST "http://$node_public/v1/publish" \
    -H 'Authorization: Bearer bench-admin' -H 'Content-Type: application/json' \
    --data-binary @"$work/record.json")
  case $code in 2*) ;; *) echo "publish answered $code: $(cat "$work/publish.out")" >&2; exit 1 ;; esac
  for _ in $(seq 1 300); do [ "$(rcli get "$prefix:seq")" = "$run" ] && break; sleep 0.1; done
  [ "$(rcli get "$prefix:seq")" = "$run" ] || { echo "record $run was not published" >&2; tail -20 "$work/node/server.log" >&2; exit 1; }
  # SLOWLOG GET entries: id, time, duration (µs), args...; the longest EVALSHA, read before
  # anything else fills the log.
  script_us=$(rcli slowlog get 1024 | python3 -c '
import sys
lines = sys.stdin.read().split("\n")
best = 0
for i, line in enumerate(lines):
    if line.strip().upper() == "EVALSHA" and i >= 1 and lines[i - 1].strip().isdigit():
        best = max(best, int(lines[i - 1]))
print(best)')
  sleep 2
  after=$(used_memory) keys_after=$(keys_bytes)
  bytes=$(stat -c %s "$work/record.json")
  result history "${BENCH_SIDE:-fanout}" "$run" "{\"users\":$users,\"record_bytes\":$bytes,\"used_memory_delta\":$((after - before)),\"keys_delta\":$((keys_after - keys_before)),\"script_us\":$script_us}"
  echo "    $row"
done
python3 - "$work/history.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"==> median of {len(rows)}: record {med('record_bytes'):.0f} B to {rows[0]['users']} users: "
      f"Redis used_memory +{med('used_memory_delta') / 1e6:.3f} MB, the node's keys "
      f"+{med('keys_delta') / 1e6:.3f} MB, publish script call {med('script_us') / 1000:.2f} ms")
PY
echo "(machine: $(machine_line))"
