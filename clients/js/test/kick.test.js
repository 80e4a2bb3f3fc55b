// Close 4004 (disconnected by an operator, DESIGN §3): the client emits "kicked", stays
// closed (no reconnect), and starts over only when the app calls connect().
// The first test uses a FAKE SERVER (the `ws` package's WebSocketServer) that closes with
// 4004 right after hello; the second one a real fanout and POST /v1/users/{user}/disconnect.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket, { WebSocketServer } from "ws";

import { FanoutClient } from "../fanout.js";
import { next, recordingWebSocket, startFanout } from "../testing/fanout-server.js";

/** @type {WebSocketServer} */
let wss;
let fakeUrl = "";
/** @type {Awaited<ReturnType<typeof startFanout>>} */
let server;
/** @type {FanoutClient[]} */
const clients = [];

before(async () => {
  let connections = 0;
  wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "fanout.v1" });
  await new Promise((ok) => wss.once("listening", ok));
  fakeUrl = `ws://127.0.0.1:${/** @type {any} */ (wss.address()).port}/ws`;
  wss.on("connection", (socket) => {
    connections++;
    socket.send(JSON.stringify({ t: "hello", conn: `c-${connections}`, user: "kim", node: "fake", heartbeat_ms: 25000, prefs: {} }));
    // The first connection is kicked; a later one (after connect()) stays.
    if (connections === 1) setTimeout(() => socket.close(4004, "disconnected by an operator"), 50);
  });
  server = await startFanout();
});

after(async () => {
  try {
    for (const c of clients) c.close();
    for (const c of wss.clients) c.terminate();
    await new Promise((ok) => wss.close(ok));
  } finally {
    await server?.dispose();
  }
});

test("4004: a kicked event, then closed with no reconnect; connect() starts over", async () => {
  const rec = recordingWebSocket(WebSocket);
  // Short backoff: had the client treated 4004 like any other close, it would be back within 50 ms.
  const client = new FanoutClient({ url: fakeUrl, user: "kim", WebSocket: rec.WebSocket, minDelayMs: 50, maxDelayMs: 100 });
  clients.push(client);
  const order = [];
  client.on("kicked", () => order.push("kicked"));
  client.on("close", () => order.push("close"));
  const kicked = next(client, "kicked");
  const closed = next(client, "close");
  client.connect();
  await next(client, "hello");
  const pending = client.getPrefs(); // in flight when the kick comes (the fake never answers)

  const [code, reason, info] = await kicked;
  assert.equal(code, 4004);
  assert.equal(reason, "disconnected by an operator");
  assert.equal(info.reconnect, false);
  assert.equal(info.delayMs, null);
  assert.equal(info.byClient, false);
  const [closeCode, , closeInfo] = await closed;
  assert.equal(closeCode, 4004, "the close event fires too, after kicked");
  assert.equal(closeInfo.reconnect, false);
  assert.deepEqual(order, ["kicked", "close"]);
  assert.equal(client.state, "closed");
  await assert.rejects(pending, { code: "disconnected" });
  await assert.rejects(client.getPrefs(), { code: "closed" });

  await sleep(800);
  assert.equal(rec.opened.length, 1, "no reconnect after 4004");

  // The user acts (logs in again): connect() opens a new connection.
  const again = next(client, "hello");
  client.connect();
  const [hello] = await again;
  assert.equal(hello.conn, "c-2");
  assert.equal(client.state, "open");
  assert.equal(rec.opened.length, 2);
});

test("POST /v1/users/{user}/disconnect: every connection of the user is kicked, none comes back", async () => {
  const rec = recordingWebSocket(WebSocket);
  const options = { url: server.wsUrl, user: "kim", WebSocket: rec.WebSocket, minDelayMs: 50, maxDelayMs: 100 };
  const tabs = [new FanoutClient({ ...options, tab: "t-1" }), new FanoutClient({ ...options, tab: "t-2" })];
  const other = new FanoutClient({ ...options, user: "lou" });
  clients.push(...tabs, other);
  for (const c of [...tabs, other]) {
    const hello = next(c, "hello");
    c.connect();
    await hello;
  }
  const kicks = tabs.map((c) => next(c, "kicked", { ms: 10000 }));
  const otherKicks = [];
  other.on("close", (code) => otherKicks.push(code));

  const res = await fetch(`${server.publicUrl}/v1/users/kim/disconnect`, { method: "POST" });
  assert.ok(res.ok, `disconnect answered ${res.status}: ${await res.text()}`);

  for (const [code, , info] of await Promise.all(kicks)) {
    assert.equal(code, 4004);
    assert.equal(info.reconnect, false);
  }
  for (const c of tabs) assert.equal(c.state, "closed");
  await sleep(800);
  assert.equal(rec.opened.length, 3, "no tab of kim reconnected");
  assert.deepEqual(otherKicks, [], "another user's connection stays");
  assert.equal(other.state, "open");

  // kim logs in again: a new connection is accepted and receives messages.
  const again = tabs[0];
  const hello = next(again, "hello");
  again.connect();
  await hello;
  const got = next(again, "robot.reply");
  assert.equal(await server.publish({ type: "robot.reply", to: { user: "kim" }, data: { text: "welcome back" } }), 202);
  assert.deepEqual((await got)[0], { text: "welcome back" });
});
