// Groups (`to: {"group": …}`, `?groups=a,b` in insecure mode) and `collapse` on msg frames
// (DESIGN §2), against a real fanout (embedded default: insecure auth).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket from "ws";

import { FanoutClient } from "../fanout.js";
import { next, recordingWebSocket, startFanout } from "../testing/fanout-server.js";

/** @type {Awaited<ReturnType<typeof startFanout>>} */
let server;
/** @type {FanoutClient[]} */
const clients = [];

before(async () => {
  server = await startFanout();
});

after(async () => {
  try {
    for (const c of clients) c.close();
  } finally {
    await server?.dispose();
  }
});

/** A connected client; resolves once `hello` arrived. */
async function connected(options) {
  const client = new FanoutClient({ url: server.wsUrl, WebSocket, ...options });
  clients.push(client);
  const hello = next(client, "hello");
  client.connect();
  await hello;
  return client;
}

test("groups must be an array of non-empty strings without commas", () => {
  for (const groups of ["store-42", [""], ["a,b"], [42]]) {
    assert.throws(() => new FanoutClient({ url: "ws://127.0.0.1:1/ws", WebSocket, groups }), TypeError, JSON.stringify(groups));
  }
});

test("groups travel as ?groups=a,b and a group message reaches only its members", async () => {
  const rec = recordingWebSocket(WebSocket);
  const member = await connected({ user: "gina", groups: ["store-42", "printers"], WebSocket: rec.WebSocket });
  const url = new URL(rec.opened[0].url);
  assert.equal(url.searchParams.get("groups"), "store-42,printers");
  const other = await connected({ user: "hank", groups: ["store-7"] });
  const none = await connected({ user: "ivan" });
  const wrong = [];
  for (const c of [other, none]) c.on("message", (data, msg) => wrong.push([msg.type, data]));

  // Both groups of the list count (the server split "store-42,printers").
  for (const group of ["store-42", "printers"]) {
    const got = next(member, "order.status");
    assert.equal(await server.publish({ type: "order.status", to: { group }, data: { group } }), 202);
    const [data, msg] = await got;
    assert.deepEqual(data, { group });
    assert.equal(msg.type, "order.status");
  }
  await sleep(300);
  assert.deepEqual(wrong, [], "connections outside the group got nothing");
});

test("msg.collapse carries the envelope's collapse key (absent without one)", async () => {
  const client = await connected({ user: "jill" });
  const seen = [];
  client.on("message", (data, msg) => seen.push([data.pct, msg.collapse]));
  const last = next(client, "message", { filter: (data) => data.pct === 100 });
  for (const pct of [10, 60]) {
    await server.publish({ type: "order.status", to: { user: "jill" }, collapse: "report-7", data: { pct } });
  }
  await server.publish({ type: "order.status", to: { user: "jill" }, data: { pct: 100 } });
  await last;
  // Live, every tick arrives (the app replaces on screen); without a key, no collapse field.
  assert.deepEqual(seen, [
    [10, "report-7"],
    [60, "report-7"],
    [100, undefined],
  ]);
});

test("a reconnecting client resumes with only the latest message of a collapse key", async () => {
  const client = await connected({ user: "kate", tab: "away" });
  // A second tab that stays: once it has the last tick, the ticks are in kate's history.
  const watcher = await connected({ user: "kate", tab: "stays" });
  const first = next(client, "message");
  await server.publish({ type: "order.status", to: { user: "kate" }, data: { step: "start" } });
  await first;
  client.close();
  const lastTick = next(watcher, "message", { filter: (data) => data.pct === 90 });
  for (const pct of [20, 50, 90]) {
    await server.publish({ type: "order.status", to: { user: "kate" }, collapse: "report-8", data: { pct } });
  }
  await lastTick;
  const replayed = [];
  client.on("message", (data, msg) => replayed.push([data, msg.collapse]));
  const resumed = next(client, "resume");
  client.connect(); // since = the "start" message
  const [resume] = await resumed;
  assert.equal(resume.recovered, true);
  assert.equal(resume.replayed, 1);
  await sleep(100);
  assert.deepEqual(replayed, [[{ pct: 90 }, "report-8"]]);
});

test("resuming from a tick that a later one replaced still recovers, with the latest tick", async () => {
  // The common case for progress bars: the last message a tab saw is itself a tick.
  const client = await connected({ user: "lena", tab: "away" });
  const watcher = await connected({ user: "lena", tab: "stays" });
  const first = next(client, "message");
  await server.publish({ type: "order.status", to: { user: "lena" }, collapse: "report-9", data: { pct: 10 } });
  const [, seen] = await first;
  client.close();
  const lastTick = next(watcher, "message", { filter: (data) => data.pct === 90 });
  for (const pct of [40, 90]) {
    await server.publish({ type: "order.status", to: { user: "lena" }, collapse: "report-9", data: { pct } });
  }
  await lastTick;
  assert.equal(client.lastId, seen.id, "since = the replaced tick");
  const replayed = [];
  client.on("message", (data) => replayed.push(data));
  const resumed = next(client, "resume");
  client.connect();
  const [resume] = await resumed;
  assert.equal(resume.recovered, true);
  assert.equal(resume.replayed, 1);
  await sleep(100);
  assert.deepEqual(replayed, [{ pct: 90 }]);
});
