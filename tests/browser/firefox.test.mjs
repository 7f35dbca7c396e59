// The dashboard in Firefox: Debian's firefox-esr, driven over WebDriver
// BiDi (Firefox's built-in remote protocol; playwright-core drives only
// Playwright's own patched Firefox builds, which a clean Debian machine does
// not have). A smoke test, not the whole suite: sign in, the overview's
// tiles and charts, the section links, a SQL query and its result table,
// Japanese, sign out — the page uses only standard web APIs, and this shows
// they behave the same in the second engine.
//
// The BiDi client is these few lines over the `ws` package: the protocol is
// JSON commands with ids and answers (https://w3c.github.io/webdriver-bidi/).
//
// Run: SLUICE_BIN=$CARGO_TARGET_DIR/debug/sluice node --test tests/browser/firefox.test.mjs
// Without firefox-esr the test fails under CI=true and is skipped otherwise.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import WebSocket from 'ws';
import { startSluice } from './server.mjs';

const FIREFOX = process.env.SLUICE_FIREFOX || '/usr/bin/firefox-esr';
const SLUICE_BIN = process.env.SLUICE_BIN
  || path.join(process.env.CARGO_TARGET_DIR || path.join(homedir(), '.cache/sluice/target'), 'debug/sluice');
const missing = [
  !existsSync(FIREFOX) && `firefox (${FIREFOX}; apt-get install firefox-esr)`,
  !existsSync(SLUICE_BIN) && `the sluice binary (${SLUICE_BIN})`,
].filter(Boolean);
if (missing.length && process.env.CI === 'true') throw new Error(`the Firefox test cannot run, missing: ${missing.join(', ')}`);
const skip = missing.length ? `skipped: missing ${missing.join(', ')}` : false;

// Starts a process (Firefox) and resolves with the first match of `re` in its stderr.
function start(cmd, args, env, re, what) {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const found = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} did not start in 60 s:\n${log}`)), 60_000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (c) => { log += c; const m = log.match(re); if (m) { clearTimeout(timer); resolve(m[1]); } });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`${what} exited (${code}):\n${log}`)); });
  });
  return { child, found, log: () => log };
}

// A minimal WebDriver BiDi session: `send(method, params)` answers the
// command's result or throws its error.
async function bidi(url) {
  const ws = new WebSocket(url);
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); });
  let next = 0;
  const waiting = new Map();
  ws.on('message', (data) => {
    const m = JSON.parse(data.toString());
    if (m.id === undefined || !waiting.has(m.id)) return;   // events
    const { resolve, reject } = waiting.get(m.id);
    waiting.delete(m.id);
    if (m.type === 'error') reject(new Error(`${m.error}: ${m.message}`)); else resolve(m.result);
  });
  const send = (method, params) => new Promise((resolve, reject) => {
    const id = ++next;
    waiting.set(id, { resolve, reject });
    ws.send(JSON.stringify({ id, method, params }));
  });
  return { send, close: () => ws.close() };
}

test('firefox: sign in, overview, section links, a SQL query, Japanese, sign out', { skip }, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'sluice-firefox-'));
  const root = 'sk_' + randomBytes(32).toString('base64url');
  let server;
  let firefox;
  let session;
  try {
    // tests/browser/server.mjs: waits until it answers, a second start if
    // the first refuses every connection.
    server = await startSluice(SLUICE_BIN, {
      dataDir: path.join(dir, 'data'),
      env: { SLUICE_BOOTSTRAP_KEY: root, SLUICE_DASHBOARD_OVERVIEW_INTERVAL: '1s', RUST_LOG: 'warn' },
    });
    const { url } = server;
    const call = async (key, method, p, body) => {
      const r = await fetch(url + p, { method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: body && JSON.stringify(body) });
      return { status: r.status, body: await r.json().catch(() => null) };
    };
    assert.equal((await call(root, 'POST', '/v1/workspaces', { name: 'fx', time_zone: 'Asia/Tokyo' })).status, 201);
    const admin = (await call(root, 'POST', '/v1/keys', { name: 'firefox', scope: 'admin', workspace: 'fx' })).body.secret;
    assert.equal((await call(admin, 'POST', '/v1/events', [{ id: 'f-1', type: 'page.viewed' }, { id: 'f-2', type: 'page.viewed' }, { id: 'f-3', type: 'signup' }])).status, 200);

    firefox = start(FIREFOX, ['--headless', '--no-remote', '--remote-debugging-port=0', '--profile', mkdtempSync(path.join(dir, 'profile-'))],
      { TZ: 'Asia/Tokyo', MOZ_CRASHREPORTER_DISABLE: '1' }, /WebDriver BiDi listening on (ws:\/\/\S+)\r?\n/, 'firefox');
    session = await bidi(`${await firefox.found}/session`);
    await session.send('session.new', { capabilities: {} });
    const { contexts } = await session.send('browsingContext.getTree', {});
    const context = contexts[0].context;
    // Evaluates `js` (an expression, awaited) in the page; answers its value
    // (through JSON: BiDi's remote values nest arrays and objects).
    const run = async (js) => {
      const r = await session.send('script.evaluate', { expression: `(async () => JSON.stringify(await (${js})))()`, target: { context }, awaitPromise: true, resultOwnership: 'none' });
      if (r.type === 'exception') throw new Error(`${js}: ${r.exceptionDetails.text}`);
      return r.result.type === 'string' ? JSON.parse(r.result.value) : undefined;
    };
    const until = async (what, js, ms = 20_000) => {
      const end = Date.now() + ms;
      for (;;) {
        const v = await run(js).catch(() => undefined);
        if (v) return v;
        if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    await session.send('browsingContext.navigate', { context, url: url + '/', wait: 'complete' });
    assert.match(await run('navigator.userAgent'), /Firefox\//);
    await until('the sign-in form', '!document.getElementById("signin-panel").hidden');
    await run(`(document.getElementById("key").value = ${JSON.stringify(admin)}, document.getElementById("signin").requestSubmit(), true)`);
    await until('the signed-in page', '!document.getElementById("app").hidden && document.getElementById("signout").hidden === false');
    // The key is in no storage the page can read; the cookie is HttpOnly.
    assert.equal(await run('document.cookie'), '');
    assert.equal(await run('JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})').then((s) => s.includes(admin)), false);
    // The overview: five tiles; after a few samples, charts with names.
    await until('five overview tiles', 'document.querySelectorAll("#overview .tile").length === 5');
    const charts = await until('the overview charts', '(() => { const s = [...document.querySelectorAll("#overview svg[role=img]")]; return s.length === 5 && s.map(x => x.getAttribute("aria-label")); })()', 30_000);
    assert.match(charts[0], /^Events accepted per sample: \d+ samples from /);
    // Section links: each one brings its section into view.
    for (const id of ['sec-settings', 'sec-sql', 'sec-overview']) {
      await run(`(document.querySelector('nav#nav a[href="#${id}"]').click(), true)`);
      await until(`#${id} in view`, `(() => { const r = document.getElementById("${id}").getBoundingClientRect(); return r.top < innerHeight && r.bottom > 0; })()`);
    }
    // A SQL query and its result table.
    await run(`(document.getElementById("sql").value = "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type", document.getElementById("sqlform").requestSubmit(), true)`);
    const rows = await until('the query result', '(() => { const t = document.querySelector("#sqlout table"); return t && [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent)); })()');
    assert.deepEqual(rows, [['page.viewed', '2'], ['signup', '1']]);
    // Japanese.
    await run('(() => { const s = document.getElementById("lang"); s.value = "ja"; s.dispatchEvent(new Event("change")); return true; })()');
    assert.equal(await run('document.documentElement.lang'), 'ja');
    assert.equal(await run('document.getElementById("h-overview").textContent'), '概要');
    // Sign out: the form comes back and the session is gone on the server.
    await run('(document.getElementById("signout").click(), true)');
    await until('the sign-in form again', '!document.getElementById("signin-panel").hidden && document.getElementById("app").hidden');
    assert.equal(await run('fetch("/v1/sessions/current").then(r => r.status)'), 401);
  } finally {
    session?.close();
    firefox?.child.kill('SIGKILL');
    server?.child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
