# scripts/bench flood [silent] [slowloris] [admin] [runs]: a flood of sockets that never
# finish a request against one node (issue 15): does it keep serving /healthz and new
# WebSocket clients, and are the flood's sockets all closed within server.header_timeout?
# See docs/benchmarks.md, "Flood". Defaults: 4000 silent and 1000 slowloris sockets on the
# public port, 200 silent ones on the admin port, 1 run. The node is a release-built
# embedded default with its default limits (header timeout 10 s, 2048 pending connections,
# 64 on the admin port); BENCH_WATCH_S (15) seconds of probing after the flood opens.
# BENCH_BASE_BIN=<another fanout build> floods that build too (side "base").
# BENCH_NOFILE=<n> runs the nodes with that open-file limit (soft and hard; default: this
# shell's), e.g. below the flood's size to see what running out of descriptors does.
silent=${1:-4000} lorises=${2:-1000} admin_n=${3:-200} runs=${4:-${BENCH_RUNS:-1}}
watch_s=${BENCH_WATCH_S:-15}
for v in "$silent" "$lorises" "$admin_n" "$runs" "$watch_s"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "flood: counts, runs and BENCH_WATCH_S are whole numbers" >&2; exit 2; }
done
[ -n "${BENCH_FANOUT_BIN:-}" ] || build
declare -A bins=([fanout]=$bin)
sides=(fanout)
if [ -n "${BENCH_BASE_BIN:-}" ]; then
  [ -x "$BENCH_BASE_BIN" ] || { echo "flood: BENCH_BASE_BIN $BENCH_BASE_BIN is not executable" >&2; exit 2; }
  bins[base]=$BENCH_BASE_BIN
  sides=(base fanout)
fi
fanout_bin=$bin
nofile=${BENCH_NOFILE:-}
[ -z "$nofile" ] || [[ "$nofile" =~ ^[1-9][0-9]*$ ]] || { echo "flood: BENCH_NOFILE is a positive integer" >&2; exit 2; }
# limited BIN: a wrapper running BIN under BENCH_NOFILE open files.
limited() {
  local wrapper="$work/limited-$(basename "$(dirname "$1")")-$(basename "$1")"
  printf '#!/bin/sh\nulimit -n %s || exit 1\nexec %s "$@"\n' "$nofile" "$1" >"$wrapper"
  chmod +x "$wrapper"
  echo "$wrapper"
}

run() {
  local side=$1 r=$2 dir="$work/$1-$2" out
  bin=${bins[$side]}
  [ -z "$nofile" ] || bin=$(limited "$bin")
  start_fanout "$dir"
  echo "==> $side run $r: $silent silent + $lorises slowloris on the public port, $admin_n silent on the admin port"
  out=$(python3 "$bench_d/flood.py" "$node_public" "$node_admin" "$node_pid" \
    "$silent" "$lorises" "$admin_n" "$watch_s") \
    || { echo "flood: the generator failed; node log:" >&2; tail -20 "$dir/server.log" >&2; exit 1; }
  local evicted
  evicted=$(curl -sf "http://$node_admin/metrics" | awk '/^fanout_http_connections_evicted_total/ {s += $2} END {print s + 0}')
  kill "$node_pid" 2>/dev/null || true
  wait "$node_pid" 2>/dev/null || true
  echo "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin); r["evicted"] = float(sys.argv[1])
print(json.dumps(r, indent=1))' "${evicted:-0}" | tee "$dir/flood.json"
  result flood "$side" "$r" "$(cat "$dir/flood.json")" "{\"bin\":\"$bin\"}"
}

echo "(node: embedded default, release build; ${sides[*]}; watching ${watch_s} s; open files: ${nofile:-$(ulimit -n)})"
for r in $(seq 1 "$runs"); do
  for side in "${sides[@]}"; do run "$side" "$r"; done
done
bin=$fanout_bin
echo "(machine: $(machine_line))"
