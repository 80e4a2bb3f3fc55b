// Unit tests of the reconnect delay (no server needed).
import assert from "node:assert/strict";
import test from "node:test";

import { backoffDelay, parseRetryMs } from "../fanout.js";

const opts = { minDelayMs: 500, maxDelayMs: 30000 };

test("full jitter: the delay spans [0, min(max, min * 2^attempt))", () => {
  // random() → 0 gives 0, random() → just under 1 gives just under the ceiling.
  const almostOne = () => 1 - Number.EPSILON;
  const ceilings = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000];
  ceilings.forEach((ceiling, attempt) => {
    assert.equal(backoffDelay(attempt, opts, () => 0), 0, `attempt ${attempt}, random 0`);
    assert.equal(backoffDelay(attempt, opts, () => 0.5), ceiling / 2, `attempt ${attempt}, random 0.5`);
    const top = backoffDelay(attempt, opts, almostOne);
    assert.ok(top < ceiling && top >= ceiling - 1, `attempt ${attempt}: ${top} just under ${ceiling}`);
  });
});

test("the cap holds for huge attempt counts, and the defaults are 500 ms / 30 s", () => {
  for (const attempt of [7, 50, 1000, 1e9, Infinity]) {
    const d = backoffDelay(attempt, opts, () => 0.999999);
    assert.ok(Number.isFinite(d) && d <= 30000 && d > 29000, `attempt ${attempt}: ${d}`);
  }
  assert.equal(backoffDelay(0, {}, () => 0.5), 250);
  assert.equal(backoffDelay(100, {}, () => 0.5), 15000);
  assert.equal(backoffDelay(-3, {}, () => 0.5), 250, "a negative attempt counts as 0");
});

test("uses Math.random by default and stays within bounds", () => {
  for (let i = 0; i < 1000; i++) {
    const attempt = i % 10;
    const d = backoffDelay(attempt, { minDelayMs: 100, maxDelayMs: 5000 });
    assert.ok(d >= 0 && d < Math.min(5000, 100 * 2 ** attempt), `attempt ${attempt}: ${d}`);
  }
});

test("parseRetryMs reads the 1012 close reason", () => {
  assert.equal(parseRetryMs('{"retry_ms":1234}'), 1234);
  assert.equal(parseRetryMs('{"retry_ms":0}'), 0);
  assert.equal(parseRetryMs(""), null);
  assert.equal(parseRetryMs("going away"), null);
  assert.equal(parseRetryMs('{"retry_ms":"5"}'), null);
  assert.equal(parseRetryMs('{"retry_ms":-1}'), null);
  assert.equal(parseRetryMs("null"), null);
});
