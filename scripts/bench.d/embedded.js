// scripts/bench embedded: one WebSocket client of an embedded-default node, and single
// messages published to it one at a time through the HTTP API, each timed alone.
//
//   node --experimental-websocket embedded.js <ws-url> <publish-url> <messages> <gap-ms>
//
// Connects <ws-url>?user=bench (insecure auth) and waits for `hello`; warms up (a message
// every 250 ms until one arrives: the consumer has joined its group, owns its partitions);
// then publishes <messages> messages {"type":"robot.reply","to":{"user":"bench"},
// "data":{"seq":k}}, each alone: a pause after the one before arrived, uniformly random in
// <gap-ms> ("lo-hi"), then the POST. A range as wide as the consumer's fetch cycle (the
// broker's fetch wait) makes the sends fall at every phase of it: a fixed or narrow pause
// would lock onto it, since the next fetch starts when a record arrives. Latency = the `msg` frame's arrival − just before
// the POST (one clock). Prints one JSON line: messages, received, lost, p50/p90/p99/max/
// mean_ms and publish_p50_ms (the POST's own time: the produce and its acknowledgement).
"use strict";

const [wsBase, publishUrl, messagesArg, gapArg] = process.argv.slice(2);
const messages = Number(messagesArg);
const [gapLo, gapHi] = gapArg.split("-").map(Number);
const LOST_AFTER_MS = 5000;
const WARMUP_TIMEOUT_MS = 60000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fail = (why) => {
  console.error(`embedded.js: ${why}`);
  process.exit(1);
};

let waiting = null; // {seq, resolve}
let warmed = false;
let closing = false;

async function publish(data) {
  const res = await fetch(publishUrl, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ type: "robot.reply", to: { user: "bench" }, data }),
  });
  await res.arrayBuffer();
  if (!res.ok) fail(`publish answered ${res.status}`);
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return round(sorted[Math.max(0, i)]);
}
const round = (x) => Math.round(x * 100) / 100;

async function main() {
  const ws = new WebSocket(`${wsBase}?user=bench`);
  const hello = new Promise((resolve, reject) => {
    ws.addEventListener("error", () => reject(new Error("WebSocket error")));
    ws.addEventListener("close", (e) => closing || fail(`WebSocket closed (${e.code})`));
    ws.addEventListener("message", (e) => {
      const f = JSON.parse(e.data);
      if (f.t === "hello") return resolve();
      if (f.t !== "msg" || !f.data) return;
      if (f.data.warm) warmed = true;
      else if (waiting && f.data.seq === waiting.seq) waiting.resolve(performance.now());
    });
  });
  await hello;

  const warmStart = performance.now();
  while (!warmed) {
    if (performance.now() - warmStart > WARMUP_TIMEOUT_MS) fail("no warm-up message arrived in 60 s");
    await publish({ warm: true });
    await sleep(250);
  }
  await sleep(1000); // the rest of the warm-up messages

  const latencies = [];
  const acks = [];
  let lost = 0;
  for (let seq = 0; seq < messages; seq++) {
    await sleep(gapLo + Math.random() * (gapHi - gapLo));
    const arrived = new Promise((resolve) => {
      waiting = { seq, resolve };
    });
    const t0 = performance.now();
    await publish({ seq });
    acks.push(performance.now() - t0);
    const t1 = await Promise.race([arrived, sleep(LOST_AFTER_MS).then(() => null)]);
    waiting = null;
    if (t1 === null) lost++;
    else latencies.push(t1 - t0);
  }
  closing = true;
  ws.close();

  latencies.sort((a, b) => a - b);
  acks.sort((a, b) => a - b);
  const mean = latencies.length ? latencies.reduce((a, b) => a + b, 0) / latencies.length : null;
  console.log(
    JSON.stringify({
      messages,
      received: latencies.length,
      lost,
      gap_ms: gapArg,
      p50_ms: percentile(latencies, 50),
      p90_ms: percentile(latencies, 90),
      p99_ms: percentile(latencies, 99),
      max_ms: latencies.length ? round(latencies[latencies.length - 1]) : null,
      mean_ms: mean === null ? null : round(mean),
      publish_p50_ms: percentile(acks, 50),
    }),
  );
  process.exit(0);
}

main().catch((e) => fail(e.stack || String(e)));
