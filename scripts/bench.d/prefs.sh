# scripts/bench prefs [rounds]: time from prefs.set on one node to the change applied on
# another node (two release nodes, Kafka, Redis, PostgreSQL on this machine).
rounds=${1:-500}
need_redis
need_postgres
need_kafka
build prefs_latency
topic=bench-$RANDOM$RANDOM
new_topic "$topic" 4
db_url=$(new_database)
cat >"$work/types.toml" <<'TOML'
[[types]]
name = "robot.reply"
[[types]]
name = "marketing"
default = false
TOML
cluster=(FANOUT__KAFKA__BROKERS="$kafka" FANOUT__KAFKA__TOPICS="$topic" FANOUT__KAFKA__GROUP_ID="$topic"
  FANOUT__REDIS__URL="$redis_url" FANOUT__REDIS__PREFIX="$topic" FANOUT__DATABASE__URL="$db_url"
  FANOUT__AUTH__JWT_SECRET=bench-secret)
node_config=$work/types.toml
declare -a public
for i in 0 1; do
  start_fanout "$work/node$i" "${cluster[@]}" FANOUT__NODE__ID="bench-$i"
  public[$i]=$node_public
done
token=$(FANOUT__AUTH__JWT_SECRET=bench-secret "$bin" token --user bench-user --ttl 1h)
echo "==> $rounds preference changes"
"$examples/prefs_latency" "ws://${public[0]}/ws" "ws://${public[1]}/ws" "$token" "$rounds"
echo "(machine: $(machine_line))"
