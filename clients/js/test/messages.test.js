// Against a real fanout (embedded default: in-process Kafka and bus, SQLite, insecure auth
// with ?user=, type registry robot.reply/order.status on, marketing off).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket from "ws";

import { FanoutClient, FanoutError } from "../fanout.js";
import { next, recordingWebSocket, startFanout } from "../testing/fanout-server.js";

/** @type {Awaited<ReturnType<typeof startFanout>>} */
let server;
/** @type {FanoutClient[]} */
const clients = [];

before(async () => {
  // An explicitly empty upstream topic: asks are disabled (the embedded default has one).
  server = await startFanout({ env: { FANOUT__KAFKA__UPSTREAM_TOPIC: "" } });
});

after(async () => {
  try {
    for (const c of clients) c.close();
  } finally {
    await server?.dispose();
  }
});

/** A connected client for `user`; resolves once `hello` arrived. */
async function connected(user, extra = {}) {
  const client = new FanoutClient({ url: server.wsUrl, user, WebSocket, ...extra });
  clients.push(client);
  const hello = next(client, "hello");
  client.connect();
  const [frame] = await hello;
  assert.equal(frame.user, user);
  return client;
}

test("a published message reaches on(type) with (data, msg)", async () => {
  const client = await connected("alice", { platform: "h5", tab: "t-1" });
  assert.equal(client.state, "open");
  assert.match(client.url, /[?&]user=alice(&|$)/);
  assert.match(client.url, /[?&]platform=h5(&|$)/);
  assert.doesNotMatch(client.url, /since=/, "no since before any message");
  const got = next(client, "robot.reply");
  assert.equal(await server.publish({ type: "robot.reply", to: { user: "alice" }, data: { text: "hi" } }), 202);
  const [data, msg] = await got;
  assert.deepEqual(data, { text: "hi" });
  assert.equal(msg.t, "msg");
  assert.equal(msg.type, "robot.reply");
  assert.equal(typeof msg.id, "string");
  assert.equal(typeof msg.ts, "number");
  assert.equal(client.lastId, msg.id);
  assert.equal(client.ack([msg.id]), true);
});

test("setPrefs switches a type off: robot.reply is filtered, order.status still arrives", async () => {
  const client = await connected("bob");
  assert.equal(client.prefs["robot.reply"], true, "hello.prefs: the registry default");
  const prefsEvents = [];
  client.on("prefs", (prefs) => prefsEvents.push(prefs));

  const prefs = await client.setPrefs({ "robot.reply": false });
  assert.equal(prefs["robot.reply"], false);
  assert.equal(prefs["order.status"], true);
  assert.equal(prefs.marketing, false);
  assert.equal(client.prefs["robot.reply"], false);
  assert.deepEqual(prefsEvents.at(-1), prefs, "the prefs event saw the change");
  assert.equal((await client.getPrefs())["robot.reply"], false);

  const robot = [];
  client.on("robot.reply", (data) => robot.push(data));
  const order = next(client, "order.status");
  // Same user → same partition → consumed in this order: had robot.reply been delivered,
  // it would have arrived before order.status.
  assert.equal(await server.publish({ type: "robot.reply", to: { user: "bob" }, data: { n: 1 } }), 202);
  assert.equal(await server.publish({ type: "order.status", to: { user: "bob" }, data: { n: 2 } }), 202);
  const [data] = await order;
  assert.deepEqual(data, { n: 2 });
  await sleep(200);
  assert.deepEqual(robot, [], "robot.reply was switched off");

  // And back on.
  assert.equal((await client.setPrefs({ "robot.reply": true }))["robot.reply"], true);
  const again = next(client, "robot.reply");
  await server.publish({ type: "robot.reply", to: { user: "bob" }, data: { n: 3 } });
  assert.deepEqual((await again)[0], { n: 3 });
});

test("setPrefs resolves with its own change, not an earlier prefs frame", async () => {
  const client = await connected("dave");
  // prefs.get is answered at once, before the prefs.set write commits: the set must not
  // take that (stale) frame for its confirmation.
  const [set, got] = await Promise.all([client.setPrefs({ marketing: true }), client.getPrefs()]);
  assert.equal(set.marketing, true);
  assert.equal(typeof got.marketing, "boolean");
  assert.equal(client.prefs.marketing, true);
});

test("setPrefs with an unknown type rejects with unknown_type", async () => {
  const client = await connected("dave");
  await assert.rejects(client.setPrefs({ "no.such.type": true }), (e) => {
    assert.ok(e instanceof FanoutError);
    assert.equal(e.code, "unknown_type");
    return true;
  });
  assert.equal(client.state, "open", "an error frame keeps the connection");
});

test("ask rejects with ask_disabled when the server has no kafka.upstream_topic", async () => {
  const client = await connected("erin");
  const errors = [];
  client.on("error", (f) => errors.push(f));
  await assert.rejects(client.ask({ text: "where is my order?" }), (e) => {
    assert.ok(e instanceof FanoutError);
    assert.equal(e.code, "ask_disabled");
    assert.equal(typeof e.ref, "string");
    return true;
  });
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "ask_disabled");
});

test("1008 (policy violation) is final: no reconnect", async () => {
  const rec = recordingWebSocket(WebSocket);
  const client = await connected("frank", { WebSocket: rec.WebSocket });
  const closed = next(client, "close");
  // More than server.max_frames_per_sec (50) frames in one second: 120, so that even if the
  // server's one-second window turns over during the burst, one side has more than 50.
  for (let i = 0; i < 120; i++) client.send({ t: "ping" });
  const [code, , info] = await closed;
  assert.equal(code, 1008);
  assert.equal(info.reconnect, false);
  assert.equal(client.state, "closed");
  await assert.rejects(client.getPrefs(), { code: "closed" });
  await sleep(1200);
  assert.equal(rec.opened.length, 1, "no second connection");
});

test("heartbeat: a server that stops answering pings is dropped and reconnected", async () => {
  const client = await connected("grace", {
    heartbeatMs: 150,
    heartbeatTimeoutMs: 400,
    connectTimeoutMs: 700,
    minDelayMs: 100,
    maxDelayMs: 400,
  });
  const dropped = next(client, "close", { ms: 5000 });
  server.proc.kill("SIGSTOP"); // the process stops answering; its sockets stay open
  try {
    const [code, reason, info] = await dropped;
    assert.equal(code, 4000);
    assert.equal(reason, "no answer to ping");
    assert.equal(info.reconnect, true);
    assert.equal(client.state, "reconnecting");
  } finally {
    server.proc.kill("SIGCONT");
  }
  const [hello] = await next(client, "hello", { ms: 10000 });
  assert.equal(hello.user, "grace");
  assert.equal(client.state, "open");
});

test("browser heartbeat: pings only while the page is hidden, and once when it shows again", async () => {
  // A stand-in for the browser's `document` (this file's tests run one after another).
  const doc = Object.assign(new EventTarget(), { visibilityState: "visible" });
  globalThis.document = /** @type {any} */ (doc);
  try {
    const rec = recordingWebSocket(WebSocket);
    const client = await connected("heidi", { WebSocket: rec.WebSocket, heartbeatMs: 100 });
    let pongs = 0;
    client.on("frame", (f) => f.t === "pong" && pongs++);
    const pings = () => rec.sent.filter((f) => f.t === "ping").length;

    await sleep(450);
    assert.equal(pings(), 0, "visible: no pings");

    doc.visibilityState = "hidden";
    doc.dispatchEvent(new Event("visibilitychange"));
    await sleep(450);
    const hidden = pings();
    assert.ok(hidden >= 2, `hidden: ${hidden} pings`);
    assert.ok(pongs >= hidden - 1, `answered: ${pongs} pongs for ${hidden} pings`);

    // Visible again: the timer stops pinging; the visibilitychange event pings once (after
    // the last pong is in, so that ping is not skipped as "already waiting").
    doc.visibilityState = "visible";
    await sleep(150);
    const before = pings();
    assert.equal(pongs, before);
    doc.dispatchEvent(new Event("visibilitychange"));
    await sleep(50);
    assert.equal(pings(), before + 1, "one ping on return to the foreground");
    await sleep(400);
    assert.equal(pings(), before + 1, "visible again: no more pings");
    assert.equal(client.state, "open");
    client.close();
  } finally {
    delete globalThis.document;
  }
});
