// The demo page in headless Chromium against a real fanout (the embedded default):
// log in, receive a published message, switch a type off and see the next one of that
// type not arrive, send an ask. A screenshot is kept in test-artifacts/ (not committed).
// Issue 17: an operator's disconnect (4004) shows on the page, which does not reconnect;
// a group message reaches a page logged in with that group; a message with a collapse key
// replaces the earlier one on screen.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import net from "node:net";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const bin = process.env.FANOUT_BIN ?? join(root, "target/debug/fanout");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

function freePort() {
  return new Promise((ok, fail) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
    s.on("error", fail);
  });
}

async function waitReady(url, ms = 30000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      if ((await fetch(url)).ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`not ready: ${url}`);
}

let server, dir, base, browser;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "fanout-demo-"));
  const [pub, adm] = [await freePort(), await freePort()];
  server = spawn(bin, ["serve"], {
    cwd: dir,
    env: {
      PATH: process.env.PATH,
      FANOUT__SERVER__LISTEN: `127.0.0.1:${pub}`,
      FANOUT__ADMIN__LISTEN: `127.0.0.1:${adm}`,
    },
    stdio: ["ignore", "ignore", "inherit"],
  });
  base = `http://127.0.0.1:${pub}`;
  await waitReady(`http://127.0.0.1:${adm}/readyz`);
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("a user logs in, receives, filters, asks — on a phone-sized screen", async () => {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/");
  await page.fill("#user", "ivy");
  await page.click("#connect");
  assert.equal(await page.isVisible("#login-fields"), false, "the login form folds away once connected");
  await page.waitForSelector('[data-testid="state"].open', { timeout: 15000 });
  await page.waitForSelector('#types input[data-type="robot.reply"]');

  // Publish to me through the page's form: it arrives.
  await page.selectOption("#pub-type", "robot.reply");
  await page.fill("#pub-text", "first reply");
  await page.click("#publish button");
  await page.waitForSelector('#messages li[data-type="robot.reply"] >> text=first reply', { timeout: 15000 });

  // Switch robot.reply off: the next one does not arrive, an order.status does.
  await page.uncheck('#types input[data-type="robot.reply"]');
  await page.waitForSelector("#types-note >> text=robot.reply switched off", { timeout: 10000 });
  await page.selectOption("#pub-type", "robot.reply");
  await page.fill("#pub-text", "muted reply");
  await page.click("#publish button");
  await page.selectOption("#pub-type", "order.status");
  await page.fill("#pub-text", "order shipped");
  await page.click("#publish button");
  await page.waitForSelector("#messages li >> text=order shipped", { timeout: 15000 });
  assert.equal(await page.locator("#messages li >> text=muted reply").count(), 0, "a switched-off type arrived");

  // Ask the assistant.
  await page.fill("#ask-text", "where is my order?");
  await page.click("#ask button");
  await page.waitForSelector("#ask-note >> text=sent to the assistant", { timeout: 15000 });

  mkdirSync(join(root, "test-artifacts"), { recursive: true });
  await page.screenshot({ path: join(root, "test-artifacts/demo-phone.png"), fullPage: true });
  assert.deepEqual(errors, [], "no script errors on the page");
  await page.close();
});

/** A page logged in as `user` (with `groups`, comma-separated, when given); WebSocket URLs it opened in `sockets`. */
async function loggedIn(user, groups = "") {
  const page = await browser.newPage();
  const sockets = [];
  const errors = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/");
  await page.fill("#user", user);
  await page.fill("#groups", groups);
  await page.click("#connect");
  await page.waitForSelector('[data-testid="state"].open', { timeout: 15000 });
  return { page, sockets, errors };
}

/** Publishes through the page's own form. */
async function publish(page, { to = "me", group = "", type = "order.status", text, collapse = "" }) {
  await page.selectOption("#pub-to", to);
  if (to === "group") await page.fill("#pub-group", group);
  await page.selectOption("#pub-type", type);
  await page.fill("#pub-text", text);
  await page.fill("#pub-collapse", collapse);
  await page.click("#publish button");
  await page.waitForSelector(`#publish-note >> text=published (${type})`, { timeout: 10000 });
  await page.$eval("#publish-note", (el) => (el.textContent = "")); // so the next publish waits for its own note
}

test("an operator's disconnect (4004) shows on the page, and the page does not reconnect", async () => {
  const { page, sockets, errors } = await loggedIn("kit");
  assert.equal(sockets.length, 1);
  const res = await fetch(`${base}/v1/users/kit/disconnect`, { method: "POST" });
  assert.ok(res.ok, `disconnect answered ${res.status}: ${await res.text()}`);

  const note = await page.waitForSelector('[data-testid="conn-note"][data-code="4004"]', { state: "visible", timeout: 10000 });
  assert.match(await note.textContent(), /Disconnected by an operator \(4004/);
  await page.waitForSelector('[data-testid="state"].closed');
  assert.equal(await page.isVisible("#login-fields"), true, "the login form is offered again");
  // The client's first retry would come within minDelayMs (500 ms): none in 1.5 s.
  await page.waitForTimeout(1500);
  assert.equal(sockets.length, 1, `the page reconnected: ${sockets.join(", ")}`);
  assert.equal(await page.textContent('[data-testid="state"]'), "closed");

  // The user acts: connecting again works, and the note goes away.
  await page.click("#connect");
  await page.waitForSelector('[data-testid="state"].open', { timeout: 15000 });
  assert.equal(sockets.length, 2);
  assert.equal(await page.isVisible('[data-testid="conn-note"]'), false);
  assert.deepEqual(errors, [], "no script errors on the page");
  await page.close();
});

test("a group message reaches a page logged in with that group, not one outside it", async () => {
  const member = await loggedIn("pat", "store-42, printers");
  assert.match(member.sockets[0], /[?&]groups=store-42%2Cprinters(&|$)/);
  const outsider = await loggedIn("quin", "store-7");
  await publish(member.page, { to: "group", group: "store-42", text: "print order 1" });
  await member.page.waitForSelector("#messages li >> text=print order 1", { timeout: 15000 });
  await publish(member.page, { to: "group", group: "printers", text: "paper low" });
  await member.page.waitForSelector("#messages li >> text=paper low", { timeout: 15000 });
  await outsider.page.waitForTimeout(300);
  assert.equal(await outsider.page.locator("#messages li[data-type]").count(), 0, "outside the group: nothing");
  assert.deepEqual([...member.errors, ...outsider.errors], []);
  await member.page.close();
  await outsider.page.close();
});

test("a message with a collapse key replaces the earlier one on screen", async () => {
  const { page, errors } = await loggedIn("ron");
  await publish(page, { text: "report 10 %", collapse: "report-7" });
  await page.waitForSelector("#messages li >> text=report 10 %", { timeout: 15000 });
  await publish(page, { text: "other job", collapse: "report-8" });
  await publish(page, { text: "report 100 %", collapse: "report-7" });
  await page.waitForSelector("#messages li >> text=report 100 %", { timeout: 15000 });
  await page.waitForSelector("#messages li >> text=other job");
  assert.equal(await page.locator("#messages li >> text=report 10 %").count(), 0, "the earlier tick was replaced");
  assert.equal(await page.locator('#messages li[data-collapse="report-7"]').count(), 1);
  assert.equal(await page.locator('#messages li[data-collapse="report-8"]').count(), 1);
  assert.equal(await page.locator("#messages li[data-type]").count(), 2);
  assert.deepEqual(errors, []);
  await page.close();
});
