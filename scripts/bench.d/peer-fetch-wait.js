// Preloaded into the socket.io peer by scripts/bench (node -r): makes its kafkajs consumer
// use the same fetch wait as fanout's librdkafka consumer ($BENCH_FETCH_WAIT_MS), leaving
// the peer's own code as it is. Without it the two would wait for the broker differently:
// kafkajs asks for up to 5 s, librdkafka for 500 ms, and tansu holds every fetch for about
// that long (half of it when it is 250 ms or more), which would swamp what is measured.
'use strict';
const kafkajs = require(require.resolve('kafkajs', { paths: [process.env.PEER_DIR] }));
const wait = Number(process.env.BENCH_FETCH_WAIT_MS);
const consumer = kafkajs.Kafka.prototype.consumer;
kafkajs.Kafka.prototype.consumer = function (options) {
  return consumer.call(this, { maxWaitTimeInMs: wait, ...options });
};
