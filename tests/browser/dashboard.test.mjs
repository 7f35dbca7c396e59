// The dashboard in a real browser: Debian's chromium, driven by
// playwright-core, against a real `sluice serve` (its own temp data dir,
// port 0, SQLite). The tests act as a person does (roles and labels), with a
// fixed browser time zone, and check the page with axe-core.
//
// Run: SLUICE_BIN=$CARGO_TARGET_DIR/debug/sluice node --test tests/browser/
// Without chromium the suite fails under CI=true and skips otherwise.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.SLUICE_CHROMIUM || '/usr/bin/chromium';
const SLUICE_BIN = process.env.SLUICE_BIN
  || path.join(process.env.CARGO_TARGET_DIR || path.join(homedir(), '.cache/sluice/target'), 'debug/sluice');
const AXE = path.join(here, 'node_modules/axe-core/axe.min.js');
const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const TIME_ZONE = 'Asia/Tokyo';

const missing = [
  !existsSync(CHROMIUM) && `chromium (${CHROMIUM}; apt-get install chromium)`,
  !existsSync(SLUICE_BIN) && `the sluice binary (${SLUICE_BIN}; cargo build, or set SLUICE_BIN)`,
  !existsSync(AXE) && `node_modules (cd tests/browser && npm install)`,
].filter(Boolean);
if (missing.length && process.env.CI === 'true') {
  // Under CI a missing browser is a failure, never a quiet skip.
  throw new Error(`browser tests cannot run, missing: ${missing.join(', ')}`);
}
const skip = missing.length ? `skipped: missing ${missing.join(', ')}` : false;
if (skip) console.log(`# browser tests ${skip}`);

let server;   // { url, child, dir, stderr }
let browser;
const keys = {};
let consumerName;

const newKey = () => 'sk_' + randomBytes(32).toString('base64url');

async function startServer() {
  const dir = mkdtempSync(path.join(tmpdir(), 'sluice-browser-'));
  const root = newKey();
  const child = spawn(SLUICE_BIN, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dir], {
    env: {
      ...process.env,
      SLUICE_BOOTSTRAP_KEY: root,
      // A webhook to a closed local port fails at once: a dead letter to show.
      SLUICE_WEBHOOK_ALLOW_PRIVATE: 'true',
      SLUICE_RETRY_ATTEMPTS: '1',
      SLUICE_RETRY_BASE_MS: '20',
      RUST_LOG: 'warn',
    },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const stderr = [];
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`sluice serve did not start in 60 s:\n${stderr.join('')}`)), 60_000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      stderr.push(chunk);
      const m = stderr.join('').match(/sluice listening on (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`sluice serve exited (${code}):\n${stderr.join('')}`)); });
  });
  return { url, child, dir, root, stderr };
}

async function call(key, method, p, body) {
  const r = await fetch(server.url + p, {
    method,
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json; try { json = JSON.parse(text); } catch { json = text; }
  return { status: r.status, body: json };
}

async function until(what, fn, ms = 30_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

before(async () => {
  if (skip) return;
  server = await startServer();
  const root = server.root;
  assert.equal((await call(root, 'POST', '/v1/workspaces', { name: 'acme', time_zone: 'Asia/Tokyo' })).status, 201);
  for (const scope of ['admin', 'read', 'ingest']) {
    const r = await call(root, 'POST', '/v1/keys', { name: `browser ${scope}`, scope, workspace: 'acme' });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    keys[scope] = r.body.secret;
  }
  const hook = await call(keys.admin, 'POST', '/v1/webhooks', { url: 'http://127.0.0.1:9/hook', event_types: ['*'] });
  assert.equal(hook.status, 201, JSON.stringify(hook.body));
  const ing = await call(keys.admin, 'POST', '/v1/events', [
    { id: 'evt-1', type: 'page.viewed', customer_id: 'cus_1' },
    { id: 'evt-2', type: 'page.viewed', customer_id: 'cus_2' },
  ]);
  assert.equal(ing.status, 200, JSON.stringify(ing.body));
  await until('dead letters', async () => (await call(keys.admin, 'GET', '/v1/dlq?status=dead')).body.data?.length >= 2);
  consumerName = hook.body.consumer;
  browser = await (await import('playwright-core')).chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_FLAGS });
});

after(async () => {
  await browser?.close();
  if (server) {
    server.child.kill('SIGKILL');
    rmSync(server.dir, { recursive: true, force: true });
  }
});

async function newPage(options = {}) {
  const context = await browser.newContext({ timezoneId: TIME_ZONE, locale: 'en-US', ...options });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await page.goto(server.url + '/');
  return { context, page };
}

async function signIn(page, key) {
  await page.getByLabel('API key').fill(key);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('button', { name: 'Sign out' }).waitFor();
}

test('an admin signs in with a key and sees the consumers list; the key is not kept in the browser', { skip }, async () => {
  const { context, page } = await newPage();
  assert.equal(await page.evaluate(() => Intl.DateTimeFormat().resolvedOptions().timeZone), TIME_ZONE);
  await signIn(page, keys.admin);
  await page.getByRole('heading', { name: 'Consumers' }).waitFor();
  await page.getByRole('region', { name: 'Consumers' }).getByText(consumerName).waitFor();
  const replay = page.getByRole('button', { name: 'Replay' }).first();
  await replay.waitFor();
  assert.equal(await replay.isEnabled(), true);
  const [cookie] = (await context.cookies()).filter((c) => c.name === 'sluice_session');
  assert.ok(cookie, 'a session cookie');
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, 'Strict');
  assert.equal(await page.evaluate(() => document.cookie), '', 'the page cannot read the cookie');
  const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
  assert.ok(!stored.includes(keys.admin), `the key is stored in the browser: ${stored}`);
  await context.close();
});

test('sign-out ends the session: the old cookie no longer works', { skip }, async () => {
  const { context, page } = await newPage();
  await signIn(page, keys.admin);
  const [cookie] = (await context.cookies()).filter((c) => c.name === 'sluice_session');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('button', { name: 'Sign in' }).waitFor();
  const inPage = await page.evaluate(async () => (await fetch('/v1/sessions/current', { credentials: 'same-origin' })).status);
  assert.equal(inPage, 401);
  // The cookie value itself is dead on the server, not only forgotten by the browser.
  const replayed = await fetch(server.url + '/v1/sessions/current', { headers: { cookie: `sluice_session=${cookie.value}` } });
  assert.equal(replayed.status, 401);
  await context.close();
});

test('a read key sees replay and discard disabled, with the reason', { skip }, async () => {
  const { context, page } = await newPage();
  await signIn(page, keys.read);
  const dlq = page.getByRole('region', { name: 'Dead letters' });
  for (const name of ['Replay', 'Discard']) {
    const button = dlq.getByRole('button', { name }).first();
    await button.waitFor();
    assert.equal(await button.isDisabled(), true, `${name} is disabled`);
    assert.match(await button.getAttribute('title'), /admin key/);
    assert.equal(await button.getAttribute('aria-describedby'), 'readonly-note');
  }
  assert.equal(await page.locator('#readonly-note').isVisible(), true);
  await context.close();
});

test('a state-changing request with the cookie but without the CSRF token is refused with 403', { skip }, async () => {
  const { context, page } = await newPage();
  await signIn(page, keys.admin);
  const result = await page.evaluate(async () => {
    const post = (headers) => fetch('/v1/keys', {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', ...headers },
      body: JSON.stringify({ name: 'from the page', scope: 'read' }),
    }).then(async (r) => ({ status: r.status, body: await r.json() }));
    const without = await post({});
    const { csrf_token } = await (await fetch('/v1/sessions/current', { credentials: 'same-origin' })).json();
    const withToken = await post({ 'X-CSRF-Token': csrf_token });
    return { without, withToken };
  });
  assert.equal(result.without.status, 403);
  assert.equal(result.without.body.error.code, 'csrf');
  assert.equal(result.withToken.status, 201, JSON.stringify(result.withToken.body));
  await context.close();
});

test('an expired session brings back the sign-in form and keeps the page as it was', { skip }, async () => {
  const { context, page } = await newPage();
  await signIn(page, keys.admin);
  await page.getByLabel('Query').fill('SELECT 42 AS answer');
  // End the session behind the page's back.
  const [cookie] = (await context.cookies()).filter((c) => c.name === 'sluice_session');
  const current = await (await fetch(server.url + '/v1/sessions/current', { headers: { cookie: `sluice_session=${cookie.value}` } })).json();
  const del = await fetch(server.url + '/v1/sessions/current', {
    method: 'DELETE', headers: { cookie: `sluice_session=${cookie.value}`, 'x-csrf-token': current.csrf_token },
  });
  assert.equal(del.status, 204);
  await page.getByRole('button', { name: 'Sign in' }).waitFor();
  await page.getByRole('alert').getByText('session has ended').waitFor();
  await signIn(page, keys.admin);
  assert.equal(await page.getByLabel('Query').inputValue(), 'SELECT 42 AS answer');
  await context.close();
});

test('axe-core finds no serious or critical violation on the sign-in and signed-in pages', { skip }, async () => {
  const { context, page } = await newPage();
  const check = async (where) => {
    await page.addScriptTag({ path: AXE });
    const violations = await page.evaluate(async () => (await globalThis.axe.run()).violations
      .map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 5) })));
    const bad = violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
    assert.deepEqual(bad, [], `${where}: ${JSON.stringify(bad, null, 2)}`);
  };
  await page.getByRole('button', { name: 'Sign in' }).waitFor();
  await check('sign-in page');
  await signIn(page, keys.read);
  await page.getByRole('region', { name: 'Dead letters' }).getByRole('button', { name: 'Replay' }).first().waitFor();
  // The events list tails the log from the moment the page opened.
  assert.equal((await call(keys.admin, 'POST', '/v1/events', { id: 'evt-live', type: 'page.viewed', customer_id: 'cus_1' })).status, 200);
  await page.getByRole('region', { name: 'Latest events' }).getByText('evt-live').waitFor();
  await check('signed-in page (read key)');
  await context.close();
});

test('switching to Japanese shows Japanese labels; a Japanese browser starts in Japanese', { skip }, async () => {
  const { context, page } = await newPage();
  await signIn(page, keys.admin);
  await page.getByLabel('Language').selectOption('ja');
  await page.getByRole('heading', { name: 'コンシューマー' }).waitFor();
  await page.getByRole('button', { name: 'サインアウト' }).waitFor();
  await page.getByRole('button', { name: '再実行' }).first().waitFor();
  assert.equal(await page.evaluate(() => document.documentElement.lang), 'ja');
  await context.close();

  const ja = await newPage({ locale: 'ja-JP' });
  await ja.page.getByRole('button', { name: 'サインイン' }).waitFor();
  await ja.page.getByLabel('APIキー').waitFor();
  await ja.context.close();
});
