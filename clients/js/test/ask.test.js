// Against a real fanout whose kafka.upstream_topic is set (embedded default: the topic is
// created in the in-process broker), so `ask` is produced upstream and answered ask.ok.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";

import { FanoutClient } from "../fanout.js";
import { next, startFanout } from "../testing/fanout-server.js";

/** @type {Awaited<ReturnType<typeof startFanout>>} */
let server;
/** @type {FanoutClient | undefined} */
let client;

before(async () => {
  server = await startFanout({ env: { FANOUT__KAFKA__UPSTREAM_TOPIC: "fanout.upstream" } });
});

after(async () => {
  try {
    client?.close();
  } finally {
    await server?.dispose();
  }
});

test("ask resolves on ask.ok; concurrent asks are matched by ref", async () => {
  client = new FanoutClient({ url: server.wsUrl, user: "alice", platform: "ios", WebSocket });
  const frames = [];
  client.on("frame", (f) => frames.push(f));
  // Asked before the connection is open: queued, sent after hello.
  const first = client.ask({ text: "what is my order status?" });
  client.connect();
  assert.equal(await first, undefined);
  const more = await Promise.all([client.ask({ n: 1 }), client.ask("plain string"), client.ask([1, 2])]);
  assert.deepEqual(more, [undefined, undefined, undefined]);
  const oks = frames.filter((f) => f.t === "ask.ok");
  assert.equal(oks.length, 4);
  assert.equal(new Set(oks.map((f) => f.ref)).size, 4, "one ask.ok per ref");
  assert.equal(frames.filter((f) => f.t === "error").length, 0);
  await assert.rejects(client.ask(null), TypeError);
});
