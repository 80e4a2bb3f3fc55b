// De-duplication by msg.id. The real fanout already drops duplicates on its side, so THIS
// FILE USES A FAKE SERVER (the `ws` package's WebSocketServer) that sends hello and then
// the same msg frame twice. Everything else is tested against a real fanout.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket, { WebSocketServer } from "ws";

import { FanoutClient } from "../fanout.js";
import { next } from "../testing/fanout-server.js";

/** @type {WebSocketServer} */
let wss;
let url = "";
/** What the fake server sends after hello, per connection (set by each test). */
let script = (/** @type {WebSocket} */ _socket) => {};

before(async () => {
  wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "fanout.v1" });
  await new Promise((ok) => wss.once("listening", ok));
  url = `ws://127.0.0.1:${/** @type {any} */ (wss.address()).port}/ws`;
  wss.on("connection", (socket) => {
    socket.send(JSON.stringify({ t: "hello", conn: "c-1", user: "alice", node: "fake", heartbeat_ms: 25000, prefs: {} }));
    script(socket);
  });
});

after(async () => {
  for (const c of wss.clients) c.terminate();
  await new Promise((ok) => wss.close(ok));
});

const msg = (id, ts, data) => JSON.stringify({ t: "msg", id, type: "robot.reply", ts, data });

test("a message delivered twice runs its handlers once", async () => {
  script = (socket) => {
    socket.send(msg("m-1", 1000, { n: 1 }));
    socket.send(msg("m-1", 1000, { n: 1 })); // the duplicate
    socket.send(msg("m-2", 1001, { n: 2 }));
    socket.send(msg("m-1", 1000, { n: 1 })); // and again, later
    socket.send(msg("m-3", 1002, { n: 3 }));
  };
  const client = new FanoutClient({ url, user: "alice", WebSocket });
  const seen = [];
  const all = [];
  client.on("robot.reply", (data, m) => seen.push(m.id));
  client.on("message", (data, m) => all.push(m.id));
  const last = next(client, "robot.reply", { filter: (_d, m) => m.id === "m-3" });
  client.connect();
  await last;
  await sleep(50);
  client.close();
  assert.deepEqual(seen, ["m-1", "m-2", "m-3"]);
  assert.deepEqual(all, ["m-1", "m-2", "m-3"]);
  assert.equal(client.lastId, "m-3");
});

test("the set of remembered ids is bounded (dedupSize)", async () => {
  script = (socket) => {
    socket.send(msg("a", 1, 1));
    socket.send(msg("b", 2, 2));
    socket.send(msg("c", 3, 3)); // pushes "a" out of a set of 2
    socket.send(msg("b", 2, 2)); // still remembered: dropped
    socket.send(msg("a", 1, 1)); // forgotten: delivered again
    socket.send(msg("end", 9, 9));
  };
  const client = new FanoutClient({ url, user: "alice", WebSocket, dedupSize: 2 });
  const seen = [];
  client.on("robot.reply", (data, m) => seen.push(m.id));
  const end = next(client, "robot.reply", { filter: (_d, m) => m.id === "end" });
  client.connect();
  await end;
  client.close();
  assert.deepEqual(seen, ["a", "b", "c", "a", "end"]);
});

test("a reused id with another ts is a new message (ids restart with a wiped broker)", async () => {
  script = (socket) => {
    socket.send(msg("7615d2f4-3-0", 1000, "before restart"));
    socket.send(msg("7615d2f4-3-0", 5000, "after restart"));
    socket.send(msg("7615d2f4-3-0", 5000, "after restart"));
  };
  const client = new FanoutClient({ url, user: "alice", WebSocket });
  const seen = [];
  client.on("robot.reply", (data) => seen.push(data));
  client.connect();
  await next(client, "robot.reply", { filter: (d) => d === "after restart" });
  await sleep(50);
  client.close();
  assert.deepEqual(seen, ["before restart", "after restart"]);
});
