// The package as an installer gets it: `npm pack`, installed from the tarball into a fresh
// consumer project (offline: the package has no dependencies), then used through `import`,
// `require` and TypeScript (this package's devDependency `typescript`) with Node's ESM and
// CommonJS resolution and a bundler's. Needs no network and no fanout server.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { buildSync } from "esbuild";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";

const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8"));
const API = ["FanoutClient", "FanoutError", "backoffDelay", "connect", "parseRetryMs"];
const npm = process.platform === "win32" ? "npm.cmd" : "npm";

let work = "";
let consumer = "";
/** @type {any[]} npm pack --json's file list */
let packed = [];

const run = (/** @type {string} */ cmd, /** @type {string[]} */ args, cwd = consumer) =>
  execFileSync(cmd, args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

before(() => {
  work = mkdtempSync(join(tmpdir(), "fanout-js-pack-"));
  // prepack (node build.js --check) runs here too: a stale fanout.cjs fails the pack.
  const out = run(npm, ["pack", "--json", "--pack-destination", work, "--loglevel=error"], PACKAGE_ROOT);
  const [info] = JSON.parse(out.slice(out.indexOf("[")));
  packed = info.files.map((/** @type {any} */ f) => f.path).sort();
  consumer = join(work, "consumer");
  mkdirSync(consumer);
  writeFileSync(join(consumer, "package.json"), JSON.stringify({ name: "consumer", private: true }));
  run(npm, ["install", "--offline", "--no-audit", "--no-fund", "--loglevel=error", join(work, info.filename)]);
});

after(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

test("package.json: installable, Apache-2.0, versioned, exports for import and require", () => {
  assert.equal(pkg.private, undefined, "not private");
  assert.equal(pkg.license, "Apache-2.0");
  assert.match(pkg.version, /^\d+\.\d+\.\d+$/);
  assert.notEqual(pkg.version, "0.0.0");
  assert.deepEqual(pkg.exports["."].import, { types: "./fanout.d.ts", default: "./fanout.js" });
  assert.deepEqual(pkg.exports["."].require, { types: "./fanout.d.cts", default: "./fanout.cjs" });
  assert.ok(pkg.engines.node);
  assert.match(readFileSync(join(PACKAGE_ROOT, "LICENSE"), "utf8"), /Apache License\s+Version 2\.0/);
});

test("the committed fanout.cjs and fanout.d.cts are what `npm run build` (esbuild) generates", () => {
  run(process.execPath, ["build.js", "--check"], PACKAGE_ROOT); // throws on exit code 1
  assert.equal(pkg.scripts.build, "node build.js");
  assert.equal(pkg.scripts.prepack, "node build.js --check");
  assert.match(readFileSync(join(PACKAGE_ROOT, "build.js"), "utf8"), /^import \{ buildSync \} from "esbuild";$/m);
});

test("build.js --check fails on a drifted fanout.cjs; build.js regenerates the committed bytes", () => {
  // A copy of the sources and outputs, with this package's node_modules (esbuild).
  const dir = join(work, "build-copy");
  mkdirSync(dir);
  for (const f of ["build.js", "fanout.js", "fanout.d.ts", "fanout.cjs", "fanout.d.cts"]) {
    copyFileSync(join(PACKAGE_ROOT, f), join(dir, f));
  }
  symlinkSync(join(PACKAGE_ROOT, "node_modules"), join(dir, "node_modules"), "dir");
  const committed = readFileSync(join(PACKAGE_ROOT, "fanout.cjs"), "utf8");
  writeFileSync(join(dir, "fanout.cjs"), committed.replace("FanoutClient", "FanoutKlient"));
  assert.throws(
    () => run(process.execPath, ["build.js", "--check"], dir),
    (/** @type {any} */ e) => e.status === 1 && /fanout\.cjs is not what `npm run build` generates/.test(e.stderr),
  );
  assert.match(run(process.execPath, ["build.js"], dir), /wrote fanout\.cjs/);
  assert.equal(readFileSync(join(dir, "fanout.cjs"), "utf8"), committed);
  run(process.execPath, ["build.js", "--check"], dir);
});

test("the tarball holds exactly the library, its types, README, CHANGELOG and LICENSE", () => {
  assert.deepEqual(packed, [
    "CHANGELOG.md",
    "LICENSE",
    "README.md",
    "fanout.cjs",
    "fanout.d.cts",
    "fanout.d.ts",
    "fanout.js",
    "package.json",
  ]);
});

test("import gets the ES module, require the CommonJS build, with the same API", () => {
  writeFileSync(
    join(consumer, "esm.mjs"),
    `import * as f from "@fanout/client";
const c = new f.FanoutClient({ url: "ws://127.0.0.1:1/ws", WebSocket: class {}, groups: ["g"] });
console.log(JSON.stringify({ file: import.meta.resolve("@fanout/client"), keys: Object.keys(f).sort(), state: c.state }));`,
  );
  writeFileSync(
    join(consumer, "cjs.cjs"),
    `const f = require("@fanout/client");
const c = new f.FanoutClient({ url: "ws://127.0.0.1:1/ws", WebSocket: class {}, groups: ["g"] });
console.log(JSON.stringify({ file: require.resolve("@fanout/client"), keys: Object.keys(f).sort(), state: c.state,
  error: new f.FanoutError("x", "y") instanceof Error, delay: f.backoffDelay(3, {}, () => 0.5) }));`,
  );
  const esm = JSON.parse(run(process.execPath, ["esm.mjs"]));
  const cjs = JSON.parse(run(process.execPath, ["cjs.cjs"]));
  assert.match(esm.file, /node_modules\/@fanout\/client\/fanout\.js$/);
  assert.match(cjs.file, /node_modules\/@fanout\/client\/fanout\.cjs$/);
  assert.deepEqual(esm.keys, API);
  assert.deepEqual(cjs.keys, API);
  assert.equal(esm.state, "idle");
  assert.equal(cjs.state, "idle");
  assert.equal(cjs.error, true);
  assert.equal(cjs.delay, 2000);
});

test("fanout.js imports nothing: a page without a bundler loads it with <script type=module>", () => {
  const { metafile } = buildSync({
    entryPoints: [join(PACKAGE_ROOT, "fanout.js")],
    bundle: true,
    format: "esm",
    platform: "browser",
    write: false,
    metafile: true,
    logLevel: "silent",
  });
  // The bundle's only input is fanout.js itself, which imports nothing.
  const inputs = Object.entries(metafile.inputs);
  assert.equal(inputs.length, 1);
  assert.match(inputs[0][0], /(^|\/)fanout\.js$/);
  assert.deepEqual(inputs[0][1].imports, []);
});

test("TypeScript finds the types for import (nodenext, bundler) and require (nodenext)", () => {
  const usage = (/** @type {string} */ lib) => `
const c = new ${lib}FanoutClient({ url: "wss://push.example.com/ws", user: "ann", groups: ["store-42"] });
c.on("kicked", (code, reason, info) => {
  const n: 4004 = code;
  const r: string = reason;
  const again: boolean = info.reconnect;
});
c.on("message", (_data, msg) => {
  const key: string | undefined = msg.collapse;
});
c.on<{ pct: number }>("report.progress", (data, msg) => {
  const pct: number = data.pct;
  const key: string | undefined = msg.collapse;
});
// @ts-expect-error groups is a list of strings
new ${lib}FanoutClient({ url: "ws://x/ws", groups: "store-42" });
// @ts-expect-error kicked passes a number code, not a string
c.on("kicked", (code: string) => {});
const e: ${lib}FanoutError = new ${lib}FanoutError("closed", "closed");
export {};
`;
  writeFileSync(join(consumer, "esm.mts"), `import { FanoutClient, FanoutError } from "@fanout/client";\n${usage("")}`);
  writeFileSync(join(consumer, "cjs.cts"), `import fanout = require("@fanout/client");\n${usage("fanout.")}`);
  writeFileSync(join(consumer, "app.ts"), `import { FanoutClient, FanoutError } from "@fanout/client";\n${usage("")}`);
  const base = { strict: true, noEmit: true, noUnusedLocals: false, lib: ["es2022"], types: [], skipLibCheck: false };
  writeFileSync(
    join(consumer, "tsconfig.node.json"),
    JSON.stringify({ compilerOptions: { ...base, module: "nodenext", moduleResolution: "nodenext" }, files: ["esm.mts", "cjs.cts"] }),
  );
  writeFileSync(
    join(consumer, "tsconfig.bundler.json"),
    JSON.stringify({ compilerOptions: { ...base, module: "esnext", moduleResolution: "bundler" }, files: ["app.ts"] }),
  );
  const tscBin = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  const tsc = (/** @type {string[]} */ ...args) => {
    try {
      return run(process.execPath, [tscBin, ...args]);
    } catch (e) {
      return assert.fail(`tsc ${args.join(" ")}:\n${/** @type {any} */ (e).stdout}${/** @type {any} */ (e).stderr}`);
    }
  };
  tsc("-p", "tsconfig.bundler.json");
  // Which declaration file each import resolved to: .d.ts for import, .d.cts for require.
  const trace = tsc("-p", "tsconfig.node.json", "--traceResolution");
  assert.match(trace, /'@fanout\/client' was successfully resolved to '[^']*fanout\.d\.ts'/);
  assert.match(trace, /'@fanout\/client' was successfully resolved to '[^']*fanout\.d\.cts'/);
});

test("fanout.js type-checks (tsc --checkJs, strict) against its own fanout.d.ts", () => {
  const config = join(work, "tsconfig.checkjs.json");
  writeFileSync(
    config,
    JSON.stringify({
      compilerOptions: {
        noEmit: true,
        allowJs: true,
        checkJs: true,
        strict: true,
        target: "es2022",
        module: "nodenext",
        moduleResolution: "nodenext",
        lib: ["es2022", "dom"],
        types: [],
      },
      files: [join(PACKAGE_ROOT, "fanout.js")],
    }),
  );
  const tscBin = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  try {
    run(process.execPath, [tscBin, "-p", config], PACKAGE_ROOT);
  } catch (e) {
    assert.fail(`tsc --checkJs fanout.js:\n${/** @type {any} */ (e).stdout}${/** @type {any} */ (e).stderr}`);
  }
});
