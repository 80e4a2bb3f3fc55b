// The demo page in headless Chromium against a real fanout (the embedded default):
// log in, receive a published message, switch a type off and see the next one of that
// type not arrive, send an ask. A screenshot is kept in test-artifacts/ (not committed).
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
