// Against a real fanout: the node drains (SIGTERM → close 1012 with {"retry_ms":N}), a new
// node starts on the same ports in the same directory, and the client comes back by itself
// with ?since=<last id>.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";

import { FanoutClient } from "../fanout.js";
import { next, recordingWebSocket, startFanout } from "../testing/fanout-server.js";

/** @type {Awaited<ReturnType<typeof startFanout>>[]} */
const servers = [];
/** @type {FanoutClient | undefined} */
let client;

after(async () => {
  try {
    client?.close();
  } finally {
    for (const s of servers) await s.dispose();
  }
});

test("reconnects after a drain (1012 retry_ms honoured) and resumes with since", async () => {
  const first = await startFanout();
  servers.push(first);
  const rec = recordingWebSocket(WebSocket);
  client = new FanoutClient({ url: first.wsUrl, user: "alice", WebSocket: rec.WebSocket });
  const resumes = [];
  client.on("resume", (resume) => resumes.push(resume));
  const hello1 = next(client, "hello");
  client.connect();
  await hello1;
  assert.equal(resumes.length, 0, "no resume without since");

  const got1 = next(client, "robot.reply");
  assert.equal(await first.publish({ type: "robot.reply", to: { user: "alice" }, data: { n: 1 } }), 202);
  const [, msg1] = await got1;
  assert.equal(client.lastId, msg1.id);

  // Drain: the server closes with 1012 and a JSON reason, then exits.
  const closed = next(client, "close");
  const stopping = first.stop();
  const [code, reason, info] = await closed;
  const closedAt = Date.now();
  assert.equal(code, 1012);
  const retryMs = JSON.parse(reason).retry_ms;
  assert.ok(Number.isInteger(retryMs) && retryMs >= 1000, `retry_ms ${retryMs}`);
  assert.equal(info.reconnect, true);
  assert.ok(info.delayMs >= retryMs && info.delayMs < retryMs + 1000, `delay ${info.delayMs} vs retry_ms ${retryMs}`);
  assert.equal(client.state, "reconnecting");
  assert.equal((await stopping).code, 0, "the drained node exits 0");

  // A new node on the same address and database.
  const hello2 = next(client, "hello", { ms: 20000 });
  const resumed = next(client, "resume", { ms: 20000 });
  const second = await startFanout({ dir: first.dir, ports: first.ports });
  servers.push(second);
  const [hello] = await hello2;
  const [resume] = await resumed;
  const reopenedAt = Date.now();
  assert.equal(hello.user, "alice");
  assert.deepEqual(resume, hello.resume);
  assert.equal(typeof resume.recovered, "boolean");
  assert.equal(typeof resume.replayed, "number");
  assert.ok(reopenedAt - closedAt >= retryMs - 50, `reconnected after ${reopenedAt - closedAt} ms, retry_ms ${retryMs}`);

  assert.equal(rec.opened.length >= 2, true);
  const firstUrl = new URL(rec.opened[0].url);
  const lastUrl = new URL(rec.opened.at(-1).url);
  assert.equal(firstUrl.searchParams.get("since"), null);
  assert.equal(lastUrl.searchParams.get("since"), msg1.id, "the reconnect carried since=<last id>");
  assert.equal(lastUrl.searchParams.get("user"), "alice");
  assert.deepEqual(rec.opened.at(-1).protocols, ["fanout.v1"]);
  // No attempt was made before retry_ms had passed.
  const firstRetryAt = rec.opened[1].at;
  assert.ok(firstRetryAt - closedAt >= retryMs - 50, `first retry ${firstRetryAt - closedAt} ms after the close, retry_ms ${retryMs}`);

  // A message published after the restart arrives. Its id is usually msg1.id again (ids
  // come from topic/partition/offset and the restarted in-process broker starts at offset 0):
  // the client must not take it for a duplicate.
  const got2 = next(client, "robot.reply");
  assert.equal(await second.publish({ type: "robot.reply", to: { user: "alice" }, data: { n: 2 } }), 202);
  const [data2, msg2] = await got2;
  assert.deepEqual(data2, { n: 2 });
  assert.equal(client.lastId, msg2.id);
});
