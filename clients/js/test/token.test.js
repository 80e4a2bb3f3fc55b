// Against a real fanout in JWT mode (the embedded default with auth.mode = "jwt"): the token
// travels as the `bearer.<jwt>` subprotocol, and an expired token (close 4003) is replaced
// by calling the token function again.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import WebSocket from "ws";

import { FanoutClient } from "../fanout.js";
import { next, recordingWebSocket, startFanout } from "../testing/fanout-server.js";

const SECRET = "js-client-test-secret";
const ADMIN = "js-client-test-admin";

/** An HS256 JWT for `sub`, expiring in `ttlSeconds`, with `extra` claims (e.g. `iat`). */
function jwt(sub, ttlSeconds, extra = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlSeconds, ...extra })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** @type {Awaited<ReturnType<typeof startFanout>>} */
let server;
/** @type {FanoutClient[]} */
const clients = [];

before(async () => {
  server = await startFanout({
    env: { FANOUT__AUTH__MODE: "jwt", FANOUT__AUTH__JWT_SECRET: SECRET, FANOUT__AUTH__ADMIN_TOKEN: ADMIN },
  });
});

after(async () => {
  try {
    for (const c of clients) c.close();
  } finally {
    await server?.dispose();
  }
});

test("4003 (token expired): the token function is called again, then the client reconnects", async () => {
  const rec = recordingWebSocket(WebSocket);
  let calls = 0;
  const client = new FanoutClient({
    url: server.wsUrl,
    WebSocket: rec.WebSocket,
    // First a token that expires in ~2 s (the server closes with 4003 at exp), then good ones.
    token: async () => (++calls === 1 ? jwt("carol", 2) : jwt("carol", 3600)),
  });
  clients.push(client);
  const hello1 = next(client, "hello");
  client.connect();
  assert.equal((await hello1)[0].user, "carol");
  assert.equal(calls, 1);

  const [code, reason, info] = await next(client, "close", { ms: 5000 });
  assert.equal(code, 4003);
  assert.equal(reason, "token expired");
  assert.equal(info.reconnect, true);
  assert.equal(info.delayMs, 0);
  const [hello2] = await next(client, "hello", { ms: 5000 });
  assert.equal(hello2.user, "carol");
  assert.equal(calls, 2, "a fresh token was fetched for the reconnect");
  assert.equal(rec.opened.length, 2);
  assert.equal(rec.opened[0].protocols[0], "fanout.v1");
  assert.notEqual(rec.opened[0].protocols[1], rec.opened[1].protocols[1]);
  assert.match(rec.opened[1].protocols[1], /^bearer\.[\w-]+\.[\w-]+\.[\w-]+$/);
  assert.doesNotMatch(rec.opened[1].url, /user=|access_token=/, "the token is not in the URL");

  const got = next(client, "order.status");
  assert.equal(await server.publish({ type: "order.status", to: { user: "carol" }, data: { order: 7 } }, ADMIN), 202);
  assert.deepEqual((await got)[0], { order: 7 });
});

test("4003 with a fixed token string: no reconnect with the same expired token", async () => {
  const rec = recordingWebSocket(WebSocket);
  const client = new FanoutClient({ url: server.wsUrl, WebSocket: rec.WebSocket, token: jwt("dan", 2) });
  clients.push(client);
  client.connect();
  await next(client, "hello");
  const [code, , info] = await next(client, "close", { ms: 5000 });
  assert.equal(code, 4003);
  assert.equal(info.reconnect, false);
  assert.equal(client.state, "closed");
  await sleep(700);
  assert.equal(rec.opened.length, 1);
});

test("a refused handshake (401) is retried with backoff, fetching a token each time", async () => {
  let calls = 0;
  const client = new FanoutClient({
    url: server.wsUrl,
    WebSocket,
    minDelayMs: 50,
    maxDelayMs: 200,
    token: () => (++calls < 3 ? "not-a-jwt" : jwt("erin", 3600)),
  });
  clients.push(client);
  const closes = [];
  client.on("close", (code, _reason, info) => closes.push([code, info.wasOpen]));
  client.connect();
  const [hello] = await next(client, "hello", { ms: 5000 });
  assert.equal(hello.user, "erin");
  assert.equal(calls, 3);
  assert.deepEqual(closes, [
    [1006, false],
    [1006, false],
  ]);
});

test("revoke: 4003, the old token is refused, the token function's newer token gets back in", async () => {
  const now = () => Math.floor(Date.now() / 1000);
  const old = jwt("rex", 3600, { iat: now() - 60 });
  let fresh = false;
  const client = new FanoutClient({
    url: server.wsUrl,
    WebSocket,
    minDelayMs: 100,
    maxDelayMs: 400,
    // Until the app's backend issues a new token, the token function still returns the old one.
    token: () => (fresh ? jwt("rex", 3600, { iat: now() }) : old),
  });
  clients.push(client);
  const closes = [];
  client.on("close", (code, _reason, info) => closes.push([code, info.wasOpen, info.reconnect]));
  const kicked = [];
  client.on("kicked", (code) => kicked.push(code));
  client.connect();
  await next(client, "hello");

  const res = await fetch(`${server.publicUrl}/v1/users/rex/disconnect`, {
    method: "POST",
    headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
    body: JSON.stringify({ revoke: true }),
  });
  assert.ok(res.ok, `disconnect answered ${res.status}: ${await res.text()}`);
  await next(client, "close", { ms: 5000, filter: (code) => code === 4003 });
  // The old token again: refused before the upgrade (401), i.e. 1006 without a hello.
  await next(client, "close", { ms: 5000, filter: (code, _r, info) => code === 1006 && !info.wasOpen });
  assert.equal(client.state, "reconnecting");
  fresh = true;
  const [hello] = await next(client, "hello", { ms: 10000 });
  assert.equal(hello.user, "rex");
  assert.deepEqual(closes[0], [4003, true, true]);
  assert.ok(closes.slice(1).every(([code, wasOpen]) => code === 1006 && !wasOpen), JSON.stringify(closes));
  assert.deepEqual(kicked, [], "a revoke is a 4003, not a kick");
});
