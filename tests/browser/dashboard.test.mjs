// The dashboard in a real browser: Debian's chromium, driven by
// playwright-core, against a real `sluice serve` (its own temp data dir,
// port 0, SQLite). The tests act as a person does (roles and labels), with a
// fixed browser time zone, and check the page with axe-core.
//
// Run: SLUICE_BIN=$CARGO_TARGET_DIR/debug/sluice node --test tests/browser/
// Without chromium the suite fails under CI=true and skips otherwise.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { startSluice } from './server.mjs';

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

let server;   // { url, child, dir, root, log() }
let browser;
const keys = {};
let consumerName;

const newKey = () => 'sk_' + randomBytes(32).toString('base64url');

// Starts a server (tests/browser/server.mjs: waits until it answers, a
// second start if the first refuses every connection).
async function startServer() {
  const dir = mkdtempSync(path.join(tmpdir(), 'sluice-browser-'));
  const root = newKey();
  const s = await startSluice(SLUICE_BIN, {
    dataDir: path.join(dir, 'data'),
    env: {
      SLUICE_BOOTSTRAP_KEY: root,
      // A webhook to a closed local port fails at once: a dead letter to show.
      SLUICE_WEBHOOK_ALLOW_PRIVATE: 'true',
      SLUICE_RETRY_ATTEMPTS: '1',
      SLUICE_RETRY_BASE_MS: '20',
      // The overview samples every second (10 s by default), so its charts
      // fill within a test.
      SLUICE_DASHBOARD_OVERVIEW_INTERVAL: '1s',
      RUST_LOG: 'warn',
    },
  });
  return { url: s.url, child: s.child, dir, root, log: s.log };
}

async function call(key, method, p, body) {
  const init = {
    method,
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  };
  // A connection that fails outright (no HTTP answer) is tried again twice,
  // then reported with its cause and the server's log; an HTTP error is
  // returned as it is.
  let r;
  for (let attempt = 1; ; attempt++) {
    try { r = await fetch(server.url + p, init); break; } catch (e) {
      if (attempt >= 3) {
        const state = `server exit code ${server.child.exitCode}, signal ${server.child.signalCode}`;
        throw new Error(`${method} ${p}: ${e.message} (${e.cause?.code || e.cause}); ${state}; server log:\n${server.log().slice(-3000)}`);
      }
      await new Promise((res) => setTimeout(res, 300));
    }
  }
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

async function axeCheck(page, where) {
  await page.addScriptTag({ path: AXE });
  const violations = await page.evaluate(async () => (await globalThis.axe.run()).violations
    .map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 5) })));
  const bad = violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  assert.deepEqual(bad, [], `${where}: ${JSON.stringify(bad, null, 2)}`);
}

test('axe-core finds no serious or critical violation on the sign-in and signed-in pages', { skip }, async () => {
  const { context, page } = await newPage();
  const check = (where) => axeCheck(page, where);
  await page.getByRole('button', { name: 'Sign in' }).waitFor();
  await check('sign-in page');
  await signIn(page, keys.read);
  await page.getByRole('region', { name: 'Dead letters' }).getByRole('button', { name: 'Replay' }).first().waitFor();
  // The events list tails the log from the moment the page opened.
  assert.equal((await call(keys.admin, 'POST', '/v1/events', { id: 'evt-live', type: 'page.viewed', customer_id: 'cus_1' })).status, 200);
  await page.getByRole('region', { name: 'Events' }).getByText('evt-live').waitFor();
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

// ---- Imports ---------------------------------------------------------------

async function ensureMeter() {
  const r = await call(keys.admin, 'POST', '/v1/meters', { key: 'gb', event_type: 'storage.used', aggregation: 'sum', value_property: 'gb' });
  assert.ok(r.status === 201 || r.status === 409, JSON.stringify(r.body));
}

const dropZone = (page) => page.getByRole('group', { name: 'Drop a usage CSV file here' });
const filePicker = (page) => page.getByLabel('or choose a CSV file', { exact: true });
const importDetail = (page) => page.getByRole('region', { name: /^Import job_/ });
const uploadButton = (page) => page.getByRole('button', { name: 'Upload', exact: true });

// Drops files on the zone as a person's drag-and-drop does: dragenter,
// dragover, drop, with a DataTransfer holding Files.
async function dropFiles(page, files) {
  await dropZone(page).evaluate((zone, files) => {
    const dataTransfer = new DataTransfer();
    for (const f of files) dataTransfer.items.add(new File([f.text], f.name, { type: f.type }));
    for (const type of ['dragenter', 'dragover', 'drop']) {
      zone.dispatchEvent(new DragEvent(type, { dataTransfer, bubbles: true, cancelable: true }));
    }
  }, files);
}

// Every POST to /v1/imports the page sends.
function watchUploads(page) {
  const posts = [];
  page.on('request', (r) => { if (r.method() === 'POST' && new URL(r.url()).pathname === '/v1/imports') posts.push(r.url()); });
  return posts;
}

const rowErrors = (page) => importDetail(page).getByRole('table', { name: 'Row errors' }).evaluate((table) =>
  [...table.tBodies[0].rows].map((tr) => [...tr.cells].map((td) => td.textContent)));

test('imports: a CSV with bad rows dropped in strict mode shows the exact row errors, downloadable as CSV', { skip }, async () => {
  await ensureMeter();
  const { context, page } = await newPage();
  const posts = watchUploads(page);
  await signIn(page, keys.admin);
  assert.equal(await uploadButton(page).isDisabled(), true, 'nothing to upload yet');
  await dropFiles(page, [{
    name: 'bad-usage.csv', type: 'text/csv',
    text: 'customer_id,meter,timestamp,quantity\n'
      + 'cus_a,gb,2024-02-01T00:00:00Z,1.5\n'
      + 'cus_a,nope,2024-02-01T00:00:00Z,2\n'
      + 'cus_a,gb,2024-02-01T00:00:00Z,"1,5 ""GB"""\n'
      + 'cus_a,gb,yesterday,3\n',
  }]);
  await dropZone(page).getByText('Selected: bad-usage.csv').waitFor();
  await page.getByLabel('Mode', { exact: true }).selectOption('strict');
  await uploadButton(page).click();

  const detail = importDetail(page);
  await detail.getByRole('status').getByText('failed').waitFor();
  await detail.getByText('The import failed: 3 invalid row(s); nothing was imported (mode strict)').waitFor();
  assert.deepEqual(await rowErrors(page), [
    ['3', 'meter', 'nope', 'no meter with this key in the workspace'],
    ['4', 'quantity', '1,5 "GB"', 'must be a decimal number such as 12.5'],
    ['5', 'timestamp', 'yesterday', 'must be RFC 3339 (2024-05-01T12:00:00Z) or a date YYYY-MM-DD'],
  ]);
  assert.equal(posts.length, 1);
  assert.match(posts[0], /\?kind=usage&mode=strict$/);

  const [download] = await Promise.all([
    page.waitForEvent('download'),
    detail.getByRole('link', { name: 'Download errors as CSV' }).click(),
  ]);
  assert.match(download.suggestedFilename(), /^job_[0-9a-f]+-errors\.csv$/);
  assert.equal(readFileSync(await download.path(), 'utf8'),
    '\ufeffrow,column,value,message\r\n'
    + '3,meter,nope,no meter with this key in the workspace\r\n'
    + '4,quantity,"1,5 ""GB""",must be a decimal number such as 12.5\r\n'
    + '5,timestamp,yesterday,must be RFC 3339 (2024-05-01T12:00:00Z) or a date YYYY-MM-DD\r\n');

  // Nothing was imported, and the API agrees with the page.
  const id = (await detail.getByRole('heading').textContent()).replace('Import ', '');
  const api = await call(keys.admin, 'GET', `/v1/imports/${id}`);
  assert.equal(api.body.status, 'failed');
  assert.equal(api.body.rows_imported, 0);
  await page.getByRole('table', { name: 'Past imports' }).getByRole('link', { name: id }).waitFor();
  await axeCheck(page, 'imports with row errors (admin key)');
  await context.close();
});

test('imports: a valid CSV chosen with the file picker reaches 100 % and succeeded, and the usage changes', { skip }, async () => {
  await ensureMeter();
  const usage = async () => (await call(keys.admin, 'GET', '/v1/meters/gb/usage?customer_id=cus_imp')).body.data;
  assert.deepEqual(await usage(), []);
  const { context, page } = await newPage();
  await signIn(page, keys.admin);
  await filePicker(page).setInputFiles({
    name: 'usage.csv', mimeType: 'text/csv',
    buffer: Buffer.from('customer_id,meter,timestamp,quantity\n'
      + 'cus_imp,gb,2024-02-01T00:00:00Z,1.5\n'
      + 'cus_imp,gb,2024-02-02T00:00:00Z,2.5\n'
      + 'cus_imp,gb,2024-02-03T00:00:00Z,3\n'),
  });
  await page.getByLabel('Mode', { exact: true }).selectOption('skip_invalid');
  await uploadButton(page).click();

  const detail = importDetail(page);
  await detail.getByRole('status').getByText('succeeded').waitFor();
  await detail.getByText('3 / 3 rows · 100 %').waitFor();
  assert.equal(await page.getByRole('progressbar', { name: 'Upload progress' }).evaluate((el) => el.value), 100);
  assert.equal(await detail.getByRole('progressbar', { name: 'Import progress' }).evaluate((el) => el.value), 100);
  await detail.getByText('No row errors.').waitFor();
  const counts = await detail.locator('dl').evaluate((dl) =>
    Object.fromEntries([...dl.querySelectorAll('dt')].map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  assert.equal(counts.rows, '3');
  assert.equal(counts.imported, '3');
  assert.equal(counts.rejected, '0');
  assert.equal(counts.duplicate, '0');
  assert.equal(counts.mode, 'skip_invalid');
  assert.equal(counts.file, 'usage.csv');

  // The meter's usage changed (once the meters consumer has caught up).
  const rows = await until('usage of cus_imp', async () => { const d = await usage(); return d.length && d; });
  assert.equal(rows.reduce((sum, r) => sum + Number(r.value), 0), 7);

  // The list links to each import's detail, with its row errors.
  const failed = page.getByRole('table', { name: 'Past imports' }).getByRole('row').filter({ hasText: 'failed' }).first();
  await failed.getByRole('link').click();
  await importDetail(page).getByRole('status').getByText('failed').waitFor();
  assert.equal((await rowErrors(page)).length, 3);
  await context.close();
});

test('imports: a read key sees the upload controls disabled, with the reason', { skip }, async () => {
  const { context, page } = await newPage();
  const posts = watchUploads(page);
  await signIn(page, keys.read);
  for (const control of [uploadButton(page), filePicker(page), page.getByLabel('Mode', { exact: true })]) {
    await control.waitFor({ state: 'attached' });
    assert.equal(await control.isDisabled(), true);
    assert.match(await control.getAttribute('title'), /admin key/);
    assert.match(await control.getAttribute('aria-describedby'), /\breadonly-note\b/);
  }
  await dropZone(page).getByText('Read-only key').waitFor();
  await dropFiles(page, [{ name: 'usage.csv', type: 'text/csv', text: 'customer_id,meter,timestamp,quantity\ncus_r,gb,2024-02-01,1\n' }]);
  await dropZone(page).getByRole('alert').getByText(/admin key/).waitFor();
  assert.equal(await uploadButton(page).isDisabled(), true);
  assert.deepEqual(posts, []);
  await context.close();
});

test('imports: a non-CSV file or one over 8 GiB gets a message at the drop zone and is not uploaded', { skip }, async () => {
  const before = (await call(keys.admin, 'GET', '/v1/imports?limit=1000')).body.data.length;
  const { context, page } = await newPage();
  const posts = watchUploads(page);
  await signIn(page, keys.admin);
  const alert = dropZone(page).getByRole('alert');

  await dropFiles(page, [{ name: 'notes.txt', type: 'text/plain', text: 'customer_id,meter,timestamp,quantity\n' }]);
  await alert.getByText('notes.txt is not a CSV file').waitFor();
  assert.equal(await uploadButton(page).isDisabled(), true);
  assert.equal(await filePicker(page).getAttribute('aria-invalid'), 'true');

  await filePicker(page).setInputFiles({ name: 'report.pdf', mimeType: 'application/pdf', buffer: Buffer.from('%PDF-1.4') });
  await alert.getByText('report.pdf is not a CSV file').waitFor();
  assert.equal(await uploadButton(page).isDisabled(), true);

  // A file over the API's limit (8 GiB): its size is faked, no such file is made.
  await dropZone(page).evaluate((zone) => {
    const file = new File(['x'], 'huge.csv', { type: 'text/csv' });
    Object.defineProperty(file, 'size', { value: 9 * 1024 ** 3 });
    const drop = new Event('drop', { bubbles: true, cancelable: true });
    Object.defineProperty(drop, 'dataTransfer', { value: { files: [file] } });
    zone.dispatchEvent(drop);
  });
  await alert.getByText('files over 8 GiB cannot be imported').waitFor();
  assert.equal(await uploadButton(page).isDisabled(), true);

  // A CSV clears the message and can be uploaded (not pressed here).
  await dropFiles(page, [{ name: 'fine.csv', type: 'text/csv', text: 'customer_id,meter,timestamp,quantity\n' }]);
  await until('the message to clear', async () => (await alert.textContent()) === '');
  assert.equal(await uploadButton(page).isEnabled(), true);

  assert.deepEqual(posts, []);
  assert.equal((await call(keys.admin, 'GET', '/v1/imports?limit=1000')).body.data.length, before);
  await context.close();
});

test('imports: the list of past imports pages on the server, "More" shows the next page', { skip }, async () => {
  // Header-only files: each is an import that succeeds with 0 rows.
  for (let i = 0; i < 21; i++) {
    const r = await fetch(server.url + '/v1/imports?kind=usage&wait=true', {
      method: 'POST', headers: { authorization: `Bearer ${keys.admin}`, 'content-type': 'text/csv' }, body: 'customer_id,meter,timestamp,quantity\n',
    });
    assert.equal(r.status, 200, await r.text());
  }
  const total = (await call(keys.admin, 'GET', '/v1/imports?limit=1000')).body.data.length;
  assert.ok(total > 20);
  const { context, page } = await newPage();
  await signIn(page, keys.admin);
  const rows = page.getByRole('table', { name: 'Past imports' }).locator('tbody tr');
  const more = page.getByRole('region', { name: 'Imports', exact: true }).getByRole('button', { name: 'More', exact: true });
  await more.waitFor();
  assert.equal(await rows.count(), 20);
  // Newest first, as the API's order=desc pages them.
  const newest = (await call(keys.admin, 'GET', '/v1/imports?order=desc&limit=20')).body.data.map((i) => i.id);
  const shown = await rows.evaluateAll((trs) => trs.map((tr) => tr.querySelector('a')?.textContent));
  assert.deepEqual(shown, newest);
  await more.click();
  await until('the next page', async () => (await rows.count()) === total);
  assert.equal(await more.isHidden(), true);
  await context.close();
});

// ---- Jobs ------------------------------------------------------------------

// A usage CSV of `rows` valid rows for the meter gb.
function usageCsv(rows, prefix) {
  const lines = ['customer_id,meter,timestamp,quantity'];
  for (let i = 0; i < rows; i++) {
    lines.push(`${prefix}${i % 7},gb,2024-02-${String(i % 28 + 1).padStart(2, '0')}T${String(i % 24).padStart(2, '0')}:00:00+09:00,0.${i % 10}`);
  }
  return lines.join('\n') + '\n';
}
async function uploadImport(csv) {
  const r = await fetch(server.url + '/v1/imports?kind=usage&mode=skip_invalid', {
    method: 'POST', headers: { authorization: `Bearer ${keys.admin}`, 'content-type': 'text/csv' }, body: csv,
  });
  const text = await r.text();
  assert.equal(r.status, 202, text);
  return JSON.parse(text).id;
}
const jobStatus = async (id) => (await call(keys.admin, 'GET', `/v1/jobs/${id}`)).body.status;

test('jobs: cancel a queued job in the jobs list (and retry it); the API agrees', { skip }, async () => {
  await ensureMeter();
  // Imports run one at a time (concurrency 1): a large first file keeps the
  // runner busy (about 7 s in a debug build: a cancel while it validates
  // does not stop it, so the cleanup below waits for it), so the imports
  // after it wait.
  const busy = await uploadImport(usageCsv(600_000, 'busy-'));
  const next = await uploadImport(usageCsv(10, 'next-'));
  const target = await uploadImport(usageCsv(10, 'target-'));
  try {
    assert.equal(await jobStatus(target), 'queued');
    const { context, page } = await newPage();
    await signIn(page, keys.admin);
    const jobs = page.getByRole('region', { name: 'Jobs' });
    await jobs.getByLabel('Job kind').selectOption('import.usage');
    await jobs.getByLabel('Job status').selectOption('queued');
    const list = jobs.getByRole('table', { name: 'Jobs' });
    const row = list.getByRole('row').filter({ hasText: target });
    await row.getByText('queued', { exact: true }).waitFor();
    // The server filters: every row listed is a queued import.
    const shownRows = () => list.locator('tbody tr').evaluateAll((trs) => trs.map((tr) => [tr.cells[1].textContent, tr.cells[2].textContent]));
    await until('only queued imports listed', async () => {
      const shown = await shownRows();
      return shown.length >= 1 && shown.every(([kind, status]) => kind === 'import.usage' && status === 'queued');
    });

    await row.getByRole('button', { name: 'Cancel' }).click();
    // It leaves the "queued" list, and is listed as cancelled, with Retry.
    await row.waitFor({ state: 'detached' });
    assert.equal(await jobStatus(target), 'cancelled');
    await jobs.getByLabel('Job status').selectOption('cancelled');
    await row.getByText('cancelled', { exact: true }).waitFor();
    const retry = row.getByRole('button', { name: 'Retry' });
    assert.equal(await retry.isEnabled(), true);
    assert.equal(await row.getByRole('button', { name: 'Cancel' }).count(), 0);

    // Retry queues it again (the busy import still runs), Cancel ends it again.
    assert.ok(!['succeeded', 'failed', 'cancelled'].includes(await jobStatus(busy)), 'the busy import ended too early: make it larger');
    await jobs.getByLabel('Job status').selectOption('');
    await retry.click();
    await row.getByText('queued', { exact: true }).waitFor();
    assert.equal(await jobStatus(target), 'queued');
    await row.getByRole('button', { name: 'Cancel' }).click();
    await row.getByText('cancelled', { exact: true }).waitFor();
    assert.equal(await jobStatus(target), 'cancelled');
    await context.close();

    // A read key sees the same job with Retry disabled, and why.
    const ro = await newPage();
    await signIn(ro.page, keys.read);
    const roJobs = ro.page.getByRole('region', { name: 'Jobs' });
    await roJobs.getByLabel('Job status').selectOption('cancelled');
    const roRetry = roJobs.getByRole('row').filter({ hasText: target }).getByRole('button', { name: 'Retry' });
    await roRetry.waitFor();
    assert.equal(await roRetry.isDisabled(), true);
    assert.match(await roRetry.getAttribute('title'), /admin key/);
    assert.equal(await roRetry.getAttribute('aria-describedby'), 'readonly-note');
    await ro.context.close();
  } finally {
    // Free the import runner for the tests after this one.
    for (const id of [busy, next, target]) await call(keys.admin, 'POST', `/v1/jobs/${id}/cancel`, {});
    await until('the imports to end', async () => {
      for (const id of [busy, next, target]) if (!['succeeded', 'failed', 'cancelled'].includes(await jobStatus(id))) return false;
      return true;
    }, 60_000);
  }
});

// ---- Dead letters ----------------------------------------------------------

test('dead letters: replay a dead letter and see it leave the list', { skip }, async () => {
  // A receiver that fails until it is told to succeed.
  let succeed = false;
  const received = [];
  const receiver = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      received.push({ answered: succeed ? 200 : 503, body });
      res.writeHead(succeed ? 200 : 503, { 'content-type': 'text/plain' });
      res.end(succeed ? 'ok' : 'not now');
    });
  });
  await new Promise((resolve) => receiver.listen(0, '127.0.0.1', resolve));
  let hook;
  try {
    hook = await call(keys.admin, 'POST', '/v1/webhooks', { url: `http://127.0.0.1:${receiver.address().port}/hook`, event_types: ['order.paid'] });
    assert.equal(hook.status, 201, JSON.stringify(hook.body));
    const consumer = hook.body.consumer;
    const { context, page } = await newPage();
    await signIn(page, keys.admin);
    assert.equal((await call(keys.admin, 'POST', '/v1/events', { id: 'evt-replay', type: 'order.paid', customer_id: 'cus_1' })).status, 200);

    // The delivery fails (one attempt in this suite): the dead letter shows up in the page.
    const list = page.getByRole('region', { name: 'Dead letters' }).getByRole('table', { name: 'Dead letters' });
    const row = list.getByRole('row').filter({ hasText: consumer }).filter({ hasText: 'evt-replay' });
    await row.waitFor();
    assert.ok(received.length >= 1 && received.every((r) => r.answered === 503), JSON.stringify(received));
    const [entry] = (await call(keys.admin, 'GET', `/v1/dlq?status=dead&consumer=${encodeURIComponent(consumer)}`)).body.data;
    assert.equal(entry.event_id, 'evt-replay');

    succeed = true;
    await row.getByRole('button', { name: 'Replay' }).click();
    // The list shows dead letters waiting only: the replayed one leaves it.
    await row.waitFor({ state: 'detached' });
    await until('the replay to be delivered', async () => (await call(keys.admin, 'GET', `/v1/dlq/${entry.id}`)).body.status === 'replayed');
    const ok = received.filter((r) => r.answered === 200);
    assert.ok(ok.length >= 1 && ok.every((r) => r.body.includes('evt-replay')), JSON.stringify(received));
    // It stays gone over the page's next refreshes (every 2 s).
    await page.waitForTimeout(2_500);
    assert.equal(await row.count(), 0);
    await list.getByRole('row').filter({ hasText: 'evt-1' }).first().waitFor();   // the other dead letters are still there
    await context.close();
  } finally {
    if (hook?.body?.id) await call(keys.admin, 'DELETE', `/v1/webhooks/${hook.body.id}`);
    await new Promise((resolve) => receiver.close(resolve));
  }
});

// ---- Bulk actions: jobs and dead letters -----------------------------------

test('jobs: select two queued jobs and cancel them; "all matching" counts first, Back changes nothing; a job opens in detail', { skip }, async () => {
  await ensureMeter();
  // As in the test above: a large import keeps the runner busy, the others wait.
  const busy = await uploadImport(usageCsv(1_200_000, 'bulk-busy-'));
  const waiting = [];
  for (let i = 0; i < 3; i++) waiting.push(await uploadImport(usageCsv(10, `bulk-${i}-`)));
  try {
    for (const id of waiting) assert.equal(await jobStatus(id), 'queued');
    const { context, page } = await newPage();
    await signIn(page, keys.admin);
    const jobs = page.getByRole('region', { name: 'Jobs' });
    await jobs.getByLabel('Job kind').selectOption('import.usage');
    await jobs.getByLabel('Job status').selectOption('queued');
    for (const id of waiting.slice(0, 2)) await jobs.getByRole('checkbox', { name: `Select ${id}` }).check();
    // The selection survives the list's refreshes (every 2 s).
    await page.waitForTimeout(2_200);
    assert.equal(await jobs.getByRole('checkbox', { name: `Select ${waiting[0]}` }).isChecked(), true);
    await jobs.getByRole('button', { name: 'Cancel selected' }).click();
    await jobs.getByText('Cancelled 2 job(s).').waitFor();
    assert.deepEqual([await jobStatus(waiting[0]), await jobStatus(waiting[1]), await jobStatus(waiting[2])], ['cancelled', 'cancelled', 'queued']);
    await jobs.getByRole('row').filter({ hasText: waiting[0] }).waitFor({ state: 'detached' });

    // All matching (queued imports): the count first; Back leaves them alone.
    await jobs.getByRole('button', { name: 'Cancel all matching' }).click();
    const confirm = jobs.getByRole('group', { name: 'This will cancel 1 job(s).' });
    await confirm.waitFor();
    await axeCheck(page, 'jobs with a bulk confirmation (admin key)');
    await confirm.getByRole('button', { name: 'Back' }).click();
    await confirm.waitFor({ state: 'hidden' });
    assert.equal(await jobStatus(waiting[2]), 'queued');
    await jobs.getByRole('button', { name: 'Cancel all matching' }).click();
    await confirm.getByRole('button', { name: 'Confirm' }).click();
    await jobs.getByText('Cancelled 1 job(s).').waitFor();
    assert.equal(await jobStatus(waiting[2]), 'cancelled');

    // A job's detail: from its id in the list, and at its own address.
    await jobs.getByLabel('Job status').selectOption('cancelled');
    await jobs.getByRole('link', { name: waiting[2] }).click();
    const detail = page.getByRole('region', { name: `Job ${waiting[2]}` });
    await detail.waitFor();
    assert.equal(new URL(page.url()).hash, `#job=${waiting[2]}`);
    await detail.getByText('cancelled', { exact: true }).waitFor();
    await detail.getByText('import.usage', { exact: true }).waitFor();
    assert.match(await detail.locator('#job-payload').textContent(), /"v": 1/);
    await axeCheck(page, 'job detail (admin key)');
    await context.close();
    const direct = await newPage();
    await signIn(direct.page, keys.admin);
    await direct.page.goto(`${server.url}/#job=${waiting[0]}`);
    await direct.page.getByRole('region', { name: `Job ${waiting[0]}` }).getByText('cancelled', { exact: true }).waitFor();
    await direct.context.close();
  } finally {
    for (const id of [busy, ...waiting]) await call(keys.admin, 'POST', `/v1/jobs/${id}/cancel`, {});
    await until('the imports to end', async () => {
      for (const id of [busy, ...waiting]) if (!['succeeded', 'failed', 'cancelled'].includes(await jobStatus(id))) return false;
      return true;
    }, 60_000);
  }
});

test('dead letters: replay all matching by consumer shows the count first, runs as a job, and the list empties', { skip }, async () => {
  let succeed = false;
  const delivered = [];
  const receiver = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      if (succeed) delivered.push(body);
      res.writeHead(succeed ? 200 : 503, { 'content-type': 'text/plain' });
      res.end(succeed ? 'ok' : 'not now');
    });
  });
  await new Promise((resolve) => receiver.listen(0, '127.0.0.1', resolve));
  let hook;
  try {
    hook = await call(keys.admin, 'POST', '/v1/webhooks', { url: `http://127.0.0.1:${receiver.address().port}/hook`, event_types: ['bulk.order'] });
    assert.equal(hook.status, 201, JSON.stringify(hook.body));
    const consumer = hook.body.consumer;
    const ids = ['bulk-evt-1', 'bulk-evt-2', 'bulk-evt-3'];
    assert.equal((await call(keys.admin, 'POST', '/v1/events', ids.map((id) => ({ id, type: 'bulk.order', customer_id: 'cus_1' })))).status, 200);
    await until('three dead letters', async () =>
      (await call(keys.admin, 'GET', `/v1/dlq?status=dead&consumer=${encodeURIComponent(consumer)}`)).body.data?.length === 3);
    const othersBefore = (await call(keys.admin, 'GET', `/v1/dlq?status=dead&consumer=${encodeURIComponent(consumerName)}`)).body.data.length;

    const { context, page } = await newPage();
    await signIn(page, keys.admin);
    const dlq = page.getByRole('region', { name: 'Dead letters' });
    const list = dlq.getByRole('table', { name: 'Dead letters' });
    // The consumer filter lists the consumers (from GET /v1/consumers).
    await until('the consumer in the filter', async () => (await dlq.getByLabel('Consumer').locator('option').allTextContents()).includes(consumer));
    await dlq.getByLabel('Consumer').selectOption(consumer);
    await until('only its entries listed', async () => {
      const rows = await list.locator('tbody tr').allTextContents();
      return rows.length === 3 && rows.every((r) => r.includes(consumer));
    });

    succeed = true;
    await dlq.getByRole('button', { name: 'Replay all matching' }).click();
    const confirm = dlq.getByRole('group', { name: 'This will replay 3 dead letter(s).' });
    await confirm.waitFor();
    // Nothing started before the confirmation.
    assert.equal((await call(keys.admin, 'GET', `/v1/dlq?status=dead&consumer=${encodeURIComponent(consumer)}`)).body.data.length, 3);
    await axeCheck(page, 'dead letters with filters and a bulk confirmation (admin key)');
    await confirm.getByRole('button', { name: 'Confirm' }).click();
    await dlq.getByText('Sent 3 dead letter(s) back to their consumer.').waitFor();
    assert.equal(await dlq.getByLabel('Bulk job progress').evaluate((p) => p.value), 100);
    await dlq.getByText('nothing here').waitFor();
    await until('the replays delivered', async () => ids.every((id) => delivered.some((b) => b.includes(id))));
    const jobs = (await call(keys.admin, 'GET', '/v1/jobs?kind=dlq.bulk&order=desc&limit=1')).body.data;
    assert.equal(jobs[0].status, 'succeeded');
    assert.deepEqual(jobs[0].result, { replaying: 3 });
    assert.equal(jobs[0].payload.consumer, consumer);
    const audit = (await call(keys.admin, 'GET', '/v1/audit?limit=1000')).body.data;
    assert.ok(audit.some((e) => e.action === 'dlq.replay_bulk' && e.details.job === jobs[0].id && e.details.matched === 3), JSON.stringify(audit.slice(-3)));
    // The other consumer's dead letters were left alone.
    assert.equal((await call(keys.admin, 'GET', `/v1/dlq?status=dead&consumer=${encodeURIComponent(consumerName)}`)).body.data.length, othersBefore);
    await context.close();
  } finally {
    if (hook?.body?.id) await call(keys.admin, 'DELETE', `/v1/webhooks/${hook.body.id}`);
    await new Promise((resolve) => receiver.close(resolve));
  }
});

test('bulk actions: a read key sees them disabled with the reason, and can still open a dead letter', { skip }, async () => {
  const { context, page } = await newPage();
  await signIn(page, keys.read);
  const regions = { Jobs: ['Cancel selected', 'Retry selected', 'Cancel all matching', 'Retry all matching'],
    'Dead letters': ['Replay selected', 'Discard selected', 'Replay all matching', 'Discard all matching'] };
  for (const [region, names] of Object.entries(regions)) {
    for (const name of names) {
      const button = page.getByRole('region', { name: region }).getByRole('button', { name, exact: true });
      await button.waitFor();
      assert.equal(await button.isDisabled(), true, `${name} is disabled`);
      assert.match(await button.getAttribute('title'), /admin key/);
      assert.equal(await button.getAttribute('aria-describedby'), 'readonly-note');
    }
  }
  const dlq = page.getByRole('region', { name: 'Dead letters' });
  const row = dlq.getByRole('table', { name: 'Dead letters' }).getByRole('row').filter({ hasText: 'evt-1' }).first();
  const box = row.getByRole('checkbox');
  await box.waitFor();
  assert.equal(await box.isDisabled(), true);
  assert.match(await box.getAttribute('title'), /admin key/);
  assert.equal(await box.getAttribute('aria-describedby'), 'readonly-note');
  // The record: its error, attempts and the event.
  await row.getByRole('link', { name: 'evt-1' }).click();
  const detail = page.getByRole('region', { name: /^Dead letter dlq_/ });
  await detail.waitFor();
  assert.match(new URL(page.url()).hash, /^#dlq=dlq_/);
  assert.match(await detail.locator('#dlq-event').textContent(), /"id": "evt-1"/);
  assert.notEqual((await detail.locator('#dlq-detail-error').textContent()).trim(), '');
  await axeCheck(page, 'dead letter detail and disabled bulk actions (read key)');
  // In Japanese too.
  await page.getByLabel('Language').selectOption('ja');
  const ja = page.getByRole('button', { name: '条件に合うものをすべて再実行' });
  await ja.waitFor();
  assert.equal(await ja.isDisabled(), true);
  await page.getByLabel('Language').selectOption('en');
  await context.close();
});

// ---- SQL -------------------------------------------------------------------

test('sql: run a SQL query, see the result table and download the CSV', { skip }, async () => {
  const { context, page } = await newPage();
  // Each query starts a worker process (a debug build, on a busy CI machine).
  page.setDefaultTimeout(60_000);
  await signIn(page, keys.admin);
  const query = `SELECT id, type, customer_id, 'a, "b"' AS note FROM events WHERE id IN ('evt-1', 'evt-2') ORDER BY id`;
  await page.getByLabel('Query').fill(query);
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  const result = page.getByRole('table', { name: 'Query result' });
  await result.waitFor();
  assert.deepEqual(await result.evaluate((table) => [...table.rows].map((tr) => [...tr.cells].map((td) => td.textContent))), [
    ['id', 'type', 'customer_id', 'note'],
    ['evt-1', 'page.viewed', 'cus_1', 'a, "b"'],
    ['evt-2', 'page.viewed', 'cus_2', 'a, "b"'],
  ]);
  await page.getByText(/^2 rows, \d+ ms$/).waitFor();

  const posts = [];
  page.on('request', (r) => { if (r.method() === 'POST' && new URL(r.url()).pathname === '/v1/sql') posts.push(JSON.parse(r.postData())); });
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.getByRole('button', { name: 'Download CSV' }).click(),
  ]);
  assert.equal(download.suggestedFilename(), 'query.csv');
  const csv = readFileSync(await download.path(), 'utf8');
  assert.equal(csv, 'id,type,customer_id,note\n'
    + 'evt-1,page.viewed,cus_1,"a, ""b"""\n'
    + 'evt-2,page.viewed,cus_2,"a, ""b"""\n');
  assert.deepEqual(posts, [{ query, format: 'csv' }]);
  await page.getByText(/^Downloaded query\.csv \(\d+ B\)\.$/).waitFor();
  // The same bytes as the API gives any client.
  const api = await fetch(server.url + '/v1/sql', {
    method: 'POST', headers: { authorization: `Bearer ${keys.read}`, 'content-type': 'application/json' }, body: JSON.stringify({ query, format: 'csv' }),
  });
  assert.equal(await api.text(), csv);
  await axeCheck(page, 'jobs filters and SQL result (admin key)');

  // A refused query: its message at the SQL box, no download.
  await page.getByLabel('Query').fill('DROP TABLE events');
  let downloads = 0;
  page.on('download', () => { downloads++; });
  await page.getByRole('button', { name: 'Download CSV' }).click();
  const message = page.locator('#sqlout .bad');
  await message.waitFor();
  assert.doesNotMatch(await message.textContent(), /^\s*[{[]/);
  assert.equal(downloads, 0);
  await context.close();
});

test('events: filter by type and customer, see a whole event, and new matching events arrive live', { skip }, async () => {
  const evs = [
    { id: 'ex-1', type: 'report.created', customer_id: 'cus_x', properties: { n: 1 } },
    { id: 'ex-2', type: 'report.created', customer_id: 'cus_y', properties: { n: 2 } },
    { id: 'ex-3', type: 'login', customer_id: 'cus_x' },
    { id: 'ex-4', type: 'report.created', customer_id: 'cus_x', properties: { n: 4, note: '日本語のメモ' } },
  ];
  assert.equal((await call(keys.ingest, 'POST', '/v1/events', evs)).status, 200);
  const { context, page } = await newPage();
  await signIn(page, keys.read);
  const region = page.getByRole('region', { name: 'Events', exact: true });
  await region.getByLabel('type').fill('report.created');
  await region.getByLabel('Customer ID').fill('cus_x');
  await region.getByRole('button', { name: 'Search' }).click();
  const ids = async () => region.getByRole('table').evaluate((t) => [...t.tBodies[0].rows].map((r) => r.cells[4].textContent));
  await until('the search result', async () => (await ids().catch(() => [])).join() === 'ex-1,ex-4');
  // The same events as the API lists for that filter.
  const api = await call(keys.read, 'GET', '/v1/events?type=report.created&customer_id=cus_x');
  assert.deepEqual(api.body.data.map((e) => e.id), ['ex-1', 'ex-4']);
  // The whole event, as JSON.
  await region.getByRole('button', { name: 'ex-4' }).click();
  const detail = page.getByRole('region', { name: 'Event ex-4' });
  await detail.waitFor();
  const shown = JSON.parse(await detail.locator('pre').textContent());
  const full = (await call(keys.read, 'GET', '/v1/events/ex-4')).body;
  assert.deepEqual(shown, full);
  assert.equal(shown.properties.note, '日本語のメモ');
  // Live: a new matching event is added, one of another type is not.
  assert.equal((await call(keys.ingest, 'POST', '/v1/events', [
    { id: 'ex-5', type: 'report.created', customer_id: 'cus_x' }, { id: 'ex-6', type: 'login', customer_id: 'cus_x' },
  ])).status, 200);
  await until('the live event', async () => (await ids()).join() === 'ex-1,ex-4,ex-5');
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal((await ids()).join(), 'ex-1,ex-4,ex-5', 'only matching events are added');
  await axeCheck(page, 'events explorer with an event shown');
  await context.close();
});

test('usage: a meter\'s usage per day of the workspace time zone, as a chart and exact values', { skip }, async () => {
  const meter = await call(keys.admin, 'POST', '/v1/meters', { key: 'disk_gb', event_type: 'disk.used', aggregation: 'sum', value_property: 'gb' });
  assert.equal(meter.status, 201, JSON.stringify(meter.body));
  // Yesterday in Tokyo, at 00:30 and 23:30 JST: two UTC days, one Tokyo day.
  const day = (offset) => new Date(Date.now() + offset * 86400000).toLocaleDateString('en-CA', { timeZone: 'Asia/Tokyo' });
  const yesterday = day(-1), today = day(0);
  assert.equal((await call(keys.ingest, 'POST', '/v1/events', [
    { id: 'd-1', type: 'disk.used', customer_id: 'cus_u', timestamp: `${yesterday}T00:30:00+09:00`, properties: { gb: '1.25' } },
    { id: 'd-2', type: 'disk.used', customer_id: 'cus_u', timestamp: `${yesterday}T23:30:00+09:00`, properties: { gb: '2.5' } },
    { id: 'd-3', type: 'disk.used', customer_id: 'cus_u', timestamp: `${today}T00:10:00+09:00`, properties: { gb: '0.5' } },
    { id: 'd-4', type: 'disk.used', customer_id: 'cus_v', timestamp: `${today}T00:10:00+09:00`, properties: { gb: '7' } },
  ])).status, 200);
  const q = `/v1/meters/disk_gb/usage?granularity=day&customer_id=cus_u&from=${yesterday}T00:00:00%2B09:00`;
  const usage = await until('the usage', async () => {
    const r = await call(keys.read, 'GET', q);
    return r.body.data?.length === 2 ? r.body.data : null;
  });
  const { context, page } = await newPage();
  await signIn(page, keys.read);
  const region = page.getByRole('region', { name: 'Meters and usage' });
  await region.getByRole('table', { name: 'Meters' }).getByText('disk_gb').waitFor();
  await region.getByLabel('Meter', { exact: true }).selectOption('disk_gb');
  await region.getByLabel('Customer ID').fill('cus_u');
  await region.getByLabel('Days').selectOption('7');
  await region.getByRole('button', { name: 'Show' }).click();
  const table = region.getByRole('table', { name: /^Usage of disk_gb for cus_u/ });
  await table.waitFor();
  const rows = await table.evaluate((t) => [...t.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent)));
  // The API's exact values, on the days of Tokyo.
  assert.deepEqual(rows, usage.map((u) => [new Date(u.period_start).toLocaleDateString('en-CA', { timeZone: 'Asia/Tokyo' }), 'cus_u', u.value]));
  assert.deepEqual(rows.map((r) => [r[0], Number(r[2])]), [[yesterday, 3.75], [today, 0.5]]);
  const chart = region.getByRole('img', { name: /^Usage of disk_gb for cus_u per day, last 7 days/ });
  const bars = await chart.evaluate((svg) => [...svg.querySelectorAll('rect')].map((r) => [r.dataset.day, Number(r.dataset.value)]));
  assert.equal(bars.length, 7);
  assert.deepEqual(bars.slice(-2), [[yesterday, 3.75], [today, 0.5]]);
  assert.ok(bars.slice(0, 5).every(([, v]) => v === 0));
  // All customers: a sum meter adds up across them.
  await region.getByLabel('Customer ID').fill('');
  await region.getByRole('button', { name: 'Show' }).click();
  await until('the chart of all customers', async () => {
    const all = await region.getByRole('img', { name: /for all customers/ }).evaluate((svg) => [...svg.querySelectorAll('rect')].map((r) => Number(r.dataset.value))).catch(() => null);
    return all && all[all.length - 1] === 7.5;
  });
  await axeCheck(page, 'meters and usage');
  await context.close();
});

test('customers: the list, one customer with its users and attributes, and links to its events and usage', { skip }, async () => {
  for (const [user, id, name] of [['u-g1', 'cus_g1', 'Globex 株式会社'], ['u-g2', 'cus_g2', 'Initech']]) {
    const r = await call(keys.ingest, 'POST', '/v1/group', { userId: user, groupId: id, traits: { name, plan: 'pro' } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
  }
  assert.equal((await call(keys.ingest, 'POST', '/v1/events', [{ id: 'g1-a', type: 'report.created', customer_id: 'cus_g1' }])).status, 200);
  await until('the customers', async () => (await call(keys.read, 'GET', '/v1/customers/cus_g2')).status === 200);
  const { context, page } = await newPage();
  await signIn(page, keys.read);
  const region = page.getByRole('region', { name: 'Customers', exact: true });
  await region.getByRole('link', { name: 'cus_g1', exact: true }).click();
  const detail = page.getByRole('region', { name: 'Customer cus_g1' });
  await detail.waitFor();
  const api = (await call(keys.read, 'GET', '/v1/customers/cus_g1')).body;
  assert.deepEqual(JSON.parse(await detail.locator('pre').textContent()), api.attributes);
  assert.equal(api.attributes.name, 'Globex 株式会社');
  await detail.getByText('u-g1').waitFor();
  // Its events, in the Events section, as the API lists them.
  await detail.getByRole('button', { name: 'Events of this customer' }).click();
  const events = page.getByRole('region', { name: 'Events', exact: true });
  const want = (await call(keys.read, 'GET', '/v1/events?customer_id=cus_g1')).body.data.map((e) => e.id);
  assert.ok(want.includes('g1-a'), JSON.stringify(want));
  await until('the customer\'s events', async () => {
    const ids = await events.getByRole('table').evaluate((t) => [...t.tBodies[0].rows].map((r) => r.cells[4].textContent)).catch(() => []);
    return ids.join() === want.join();
  });
  assert.equal(await events.getByLabel('Customer ID').inputValue(), 'cus_g1');
  await axeCheck(page, 'customers with one shown');
  await context.close();
});

test('billing: select two of three subscriptions, bill them now, watch the run, open an invoice as HTML and download its PDF', { skip }, async () => {
  const plan = await call(keys.admin, 'POST', '/v1/plans', {
    code: 'basic', name: 'Basic', currency: 'JPY', interval: 'month', fixed_fees: [{ name: 'Base', amount: '3000', tax_rate: '0.10' }],
  });
  assert.equal(plan.status, 201, JSON.stringify(plan.body));
  // Started two hours ago: "now" has a part of the period to bill.
  const start = new Date(Date.now() - 2 * 3600_000).toISOString();
  const subs = await call(keys.admin, 'POST', '/v1/subscriptions', ['b-1', 'b-2', 'b-3'].map((id) => ({ id, customer_id: `cus_${id}`, plan: 'basic', start })));
  assert.equal(subs.status, 201, JSON.stringify(subs.body));
  const { context, page } = await newPage({ acceptDownloads: true });
  await signIn(page, keys.admin);
  const region = page.getByRole('region', { name: 'Billing', exact: true });
  await region.getByRole('table', { name: 'Plans' }).getByText('basic', { exact: true }).waitFor();
  const bill = region.getByRole('button', { name: 'Bill selected now' });
  assert.equal(await bill.isDisabled(), true, 'nothing selected yet');
  await region.getByRole('checkbox', { name: 'Select b-1' }).check();
  await region.getByRole('checkbox', { name: 'Select b-3' }).check();
  await bill.click();
  const detail = page.getByRole('region', { name: /^Billing run job_/ });
  await detail.waitFor();
  await until('the run to succeed', async () => {
    const text = await detail.textContent();
    return text.includes('succeeded') && text.includes('2 / 2 subscriptions');
  });
  // Exactly the two selected are invoiced, as the API says.
  const inv = (await call(keys.read, 'GET', '/v1/invoices')).body.data;
  assert.deepEqual(inv.map((i) => i.subscription_id).sort(), ['b-1', 'b-3']);
  assert.ok(inv.every((i) => i.status === 'finalized' && i.early === true), JSON.stringify(inv));
  const invoices = region.getByRole('table', { name: 'Invoices' });
  const first = inv[0];
  await until('the invoices listed', async () => (await invoices.textContent().catch(() => '')).includes(first.number));
  const totals = await invoices.evaluate((t) => [...t.tBodies[0].rows].map((r) => r.cells[5].textContent));
  assert.deepEqual(totals.sort(), inv.map((i) => `${i.total.replace(/\B(?=(\d{3})+(?!\d))/g, ',')} JPY`).sort());
  // The HTML view (same session) and the PDF download.
  const href = await invoices.getByRole('link', { name: `HTML ${first.number}` }).getAttribute('href');
  const html = await page.evaluate(async (h) => (await fetch(h, { credentials: 'same-origin' })).text(), href);
  assert.ok(html.includes(first.number) && html.includes('cus_'), html.slice(0, 300));
  const [download] = await Promise.all([page.waitForEvent('download'), invoices.getByRole('link', { name: `PDF ${first.number}` }).click()]);
  assert.equal(readFileSync(await download.path()).subarray(0, 5).toString(), '%PDF-');
  assert.equal(download.suggestedFilename(), `${first.number}.pdf`);
  // A run with a failing subscription shows the failure.
  const failing = await call(keys.admin, 'POST', '/v1/billing-runs?wait=true', { subscription_ids: ['b-2', 'no-such-sub'], until: 'now' });
  assert.equal(failing.status, 200, JSON.stringify(failing.body));
  await until('the run listed', async () => (await region.getByRole('table', { name: 'Billing runs' }).textContent().catch(() => '')).includes(failing.body.id));
  await region.getByRole('button', { name: failing.body.id }).click();
  const failed = page.getByRole('region', { name: `Billing run ${failing.body.id}` });
  await failed.getByRole('table', { name: 'Subscriptions that could not be billed' }).getByText('no-such-sub', { exact: true }).waitFor();
  await axeCheck(page, 'billing');
  await context.close();
});

test('billing: a read key sees the bill buttons and the selection disabled, with the reason', { skip }, async () => {
  await until('a subscription', async () => (await call(keys.read, 'GET', '/v1/subscriptions')).body.data?.length > 0, 5_000).catch(async () => {
    assert.equal((await call(keys.admin, 'POST', '/v1/plans', { code: 'ro', name: 'RO', currency: 'JPY', interval: 'month' })).status, 201);
    assert.equal((await call(keys.admin, 'POST', '/v1/subscriptions', { id: 'ro-1', customer_id: 'cus_ro', plan: 'ro' })).status, 201);
  });
  const { context, page } = await newPage();
  await signIn(page, keys.read);
  const region = page.getByRole('region', { name: 'Billing', exact: true });
  await region.getByRole('checkbox').first().waitFor();
  for (const name of ['Bill selected now', 'Bill all due']) {
    const b = region.getByRole('button', { name });
    assert.equal(await b.isDisabled(), true, `${name} is disabled`);
    assert.match(await b.getAttribute('title'), /admin key/);
  }
  assert.equal(await region.getByRole('checkbox').first().isDisabled(), true);
  await context.close();
});

// ---- Customers and health ----------------------------------------------------
// In a workspace of their own (Asia/Tokyo): the health configuration and
// the customers here change nothing the other tests read.

const HEALTH_CONFIG = {
  measures: {
    logins_7d: { kind: 'count', event_type: 'login', days: 7 },
    seats: { kind: 'attribute', attribute: 'seats' },
  },
  // The first stage whose rule holds wins: `onboarding` only by an override.
  stages: [{ name: 'adoption', rule: { all: [] } }, { name: 'onboarding', rule: { all: [] } }],
  scorecards: {
    adoption: [{ measure: 'logins_7d', weight: 1, linear: { from: 0, to: 5 } }, { measure: 'seats', weight: 1, linear: { from: 0, to: 10 } }],
    onboarding: [{ measure: 'logins_7d', weight: 1, linear: { from: 0, to: 5 } }],
  },
};
let healthKeys;   // { admin, read } of the workspace `health`, once it is set up

const byPriority = async (key, query = '') => (await call(key, 'GET', `/v1/customers?sort=priority${query}`)).body.data;

// h_1, h_2 and h_3 log in 1, 3 and 5 times; the configuration scores logins
// 0–5 linearly, and seats 0–10 (set for h_1 only: the others have no data,
// and logins carry the whole weight). So the scores are 35 (bad), 60
// (normal) and 100 (good), and with mrr 1000, 5000 and 9000 the priorities,
// (100 − score) / 100 × mrr, are 650, 2000 and 0.
async function healthWorkspace() {
  if (healthKeys) return healthKeys;
  const ws = await call(server.root, 'POST', '/v1/workspaces', { name: 'health', time_zone: 'Asia/Tokyo' });
  assert.equal(ws.status, 201, JSON.stringify(ws.body));
  const k = {};
  for (const scope of ['admin', 'read']) {
    const r = await call(server.root, 'POST', '/v1/keys', { name: `health ${scope}`, scope, workspace: 'health' });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    k[scope] = r.body.secret;
  }
  const events = [];
  for (const [id, n] of [['h_1', 1], ['h_2', 3], ['h_3', 5]]) {
    for (let i = 0; i < n; i++) events.push({ id: `${id}-login-${i}`, type: 'login', customer_id: id });
  }
  const ing = await call(k.admin, 'POST', '/v1/events', events);
  assert.equal(ing.status, 200, JSON.stringify(ing.body));
  const put = await call(k.admin, 'PUT', '/v1/health/config', HEALTH_CONFIG);
  assert.equal(put.status, 201, JSON.stringify(put.body));
  assert.ok(put.body.recompute_job?.id, JSON.stringify(put.body));
  await until('the three customers listed by priority', async () => (await byPriority(k.admin)).length === 3);
  for (const [id, attributes] of [['h_1', { mrr: 1000, seats: 5 }], ['h_2', { mrr: 5000 }], ['h_3', { mrr: 9000, name: 'Umbrella 株式会社' }]]) {
    const r = await call(k.admin, 'PATCH', `/v1/customers/${id}`, attributes);
    assert.equal(r.status, 200, JSON.stringify(r.body));
  }
  await until('the scores and priorities', async () => JSON.stringify((await byPriority(k.admin)).map((c) => [c.customer_id, c.score, c.band, c.priority]))
    === JSON.stringify([['h_2', 60, 'normal', 2000], ['h_1', 35, 'bad', 650], ['h_3', 100, 'good', 0]]));
  healthKeys = k;
  return k;
}

const customersRegion = (page) => page.getByRole('region', { name: 'Customers', exact: true });
// The cells' text of a table's body rows ([] while the table is not there).
const bodyRows = (table) => table.evaluate((t) => [...t.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent.trim())), undefined, { timeout: 2_000 })
  .catch(() => []);
// A number as the page shows it ("2,000"; "—" for none).
const numberOf = (s) => (s === '—' ? null : Number(s.replace(/,/g, '')));

test('customers: the list by priority with bands in words, the band filter, and a customer\'s page: why table, stage rule, explanation, score history chart; in Japanese too', { skip }, async () => {
  const k = await healthWorkspace();
  const want = await byPriority(k.read);
  const { context, page } = await newPage();
  await signIn(page, k.read);
  const region = customersRegion(page);
  const list = region.getByRole('table', { name: 'Customers', exact: true });
  // With a health configuration the list starts by priority, highest first.
  await until('the list by priority', async () => (await bodyRows(list)).map((r) => r[0]).join() === want.map((c) => c.customer_id).join());
  assert.equal(await region.getByLabel('Sort').inputValue(), 'priority');
  // customer, name, stage, band, score, priority, MRR: as the API says, the band in words.
  const rows = await bodyRows(list);
  assert.deepEqual(rows.map((r) => [r[0], r[2], r[3], numberOf(r[4]), numberOf(r[5]), numberOf(r[6])]),
    want.map((c) => [c.customer_id, c.stage, c.band, c.score, c.priority, c.attributes.mrr]));
  assert.deepEqual(rows.map((r) => r[3]), ['normal', 'bad', 'good']);
  assert.equal(rows[2][1], 'Umbrella 株式会社');
  // The band filter lists what the API lists for it.
  await region.getByLabel('Band').selectOption('bad');
  const bad = (await byPriority(k.read, '&band=bad')).map((c) => c.customer_id);
  assert.deepEqual(bad, ['h_1']);
  await until('the bad customers', async () => (await bodyRows(list)).map((r) => r[0]).join() === bad.join());
  await region.getByLabel('Band').selectOption('');
  await until('all customers again', async () => (await bodyRows(list)).length === 3);

  // The customer's page, at its own address.
  await list.getByRole('link', { name: 'h_2', exact: true }).click();
  const detail = page.getByRole('region', { name: 'Customer h_2' });
  await detail.waitFor();
  assert.equal(new URL(page.url()).hash, '#customer=h_2');
  const health = (await call(k.read, 'GET', '/v1/customers/h_2/health')).body;
  assert.equal(health.score, 60);
  assert.deepEqual(JSON.parse(await detail.locator('pre').textContent()), (await call(k.read, 'GET', '/v1/customers/h_2')).body.attributes);
  // Why: each measure's value, points, weight and contribution as the API
  // explains them; seats has no data and says so; the score row is the sum.
  const why = detail.getByRole('table', { name: 'Why this score' });
  const whyRows = await bodyRows(why);   // measure (name kind), value, points, weight, share, contribution, note
  assert.deepEqual(whyRows.map((r) => [r[0].split(' ')[0], numberOf(r[1]), numberOf(r[2]), numberOf(r[3]), numberOf(r[5])]),
    health.measures.map((m) => [m.name, m.value, m.points, m.weight, m.contribution]));
  const seats = whyRows.find((r) => r[0].startsWith('seats'));
  assert.match(seats[6], /^no data/);
  assert.equal(health.measures.find((m) => m.name === 'seats').has_data, false);
  const shown = numberOf(await why.evaluate((t) => t.tFoot.rows[0].cells[1].textContent.trim()));
  const sum = whyRows.map((r) => numberOf(r[5])).filter((n) => n != null).reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(sum - shown) < 1e-9, `contributions add up to ${sum}, the score shown is ${shown}`);
  assert.equal(shown, health.score);
  assert.equal(numberOf(await detail.locator('dd[data-kv="score"]').textContent()), health.score);
  // The stage and the rule that put it there; the explanation sentences.
  assert.equal(health.stage_reason, 'rule');
  await detail.getByText('Stage adoption: the first stage whose rule holds. Rule: always holds').waitFor();
  assert.deepEqual(await detail.getByRole('listitem').allTextContents(), health.explanation);
  assert.ok(health.explanation.length > 0);
  // The score history as an SVG with a title: one dot per change, as the API lists them.
  const history = (await call(k.read, 'GET', '/v1/customers/h_2/health/history')).body.data;
  assert.ok(history.length > 0);
  const chart = detail.getByRole('img', { name: /^Score of h_2 over time, on a scale of 0 to 100/ });
  await chart.waitFor();
  assert.equal(await chart.evaluate((e) => e.tagName.toLowerCase()), 'svg');
  assert.match(await chart.locator('title').first().textContent(), /^Score of h_2 over time/);
  const dots = await chart.locator('circle').evaluateAll((cs) => cs.map((c) => [c.dataset.at, Number(c.dataset.score), Number(c.getAttribute('cy'))]));
  assert.deepEqual(dots.map((d) => [d[0], d[1]]), history.filter((h) => h.score != null).map((h) => [h.at, h.score]));
  // y is the score on 0–100: 60 sits 40 % of the plot's height below 100.
  const [top, bottom] = await chart.locator('line').evaluateAll((ls) => [Number(ls[2].getAttribute('y1')), Number(ls[0].getAttribute('y1'))]);
  assert.ok(Math.abs(dots.at(-1)[2] - (top + (bottom - top) * 0.4)) < 0.2, JSON.stringify({ dots, top, bottom }));
  await axeCheck(page, 'a customer\'s page');

  // Japanese: the same page, relabelled.
  await page.getByLabel('Language').selectOption('ja');
  await page.getByRole('region', { name: '顧客 h_2' }).waitFor();
  await page.getByRole('heading', { name: 'スコアの内訳' }).waitFor();
  await page.getByRole('heading', { name: 'スコアの履歴' }).waitFor();
  await page.getByRole('table', { name: 'スコアの内訳' }).getByText('スコア (寄与の合計)').waitFor();
  await page.getByRole('img', { name: /^h_2 のスコアの推移/ }).waitFor();
  assert.deepEqual((await bodyRows(page.getByRole('table', { name: '顧客', exact: true }))).map((r) => r[3]), ['普通', '要注意', '良好']);
  assert.equal(await page.getByLabel('バンド').inputValue(), '');
  await context.close();
});

test('customers: an admin sets a stage override with a reason and an end in Tokyo time, then lifts it; a read key sees the form disabled', { skip }, async () => {
  const k = await healthWorkspace();
  const { context, page } = await newPage();
  // The address of a customer's page opens it after signing in.
  await page.goto(server.url + '/#customer=h_3');
  await signIn(page, k.admin);
  const detail = page.getByRole('region', { name: 'Customer h_3' });
  await detail.waitFor();
  await detail.getByText('No override: the rules decide the stage.').waitFor();
  const lift = detail.getByRole('button', { name: 'Lift override' });
  assert.equal(await lift.isDisabled(), true, 'nothing to lift yet');
  // Until 09:00 in Tokyo two days from now: 00:00 UTC of that date.
  const day = new Intl.DateTimeFormat('en-CA', { timeZone: 'Asia/Tokyo', year: 'numeric', month: '2-digit', day: '2-digit' })
    .format(new Date(Date.now() + 2 * 86_400_000));
  await detail.getByLabel('Override stage').selectOption('onboarding');
  await detail.getByLabel('Reason').fill('kickoff call');
  await detail.getByLabel('Until (Asia/Tokyo; empty: until lifted)').fill(`${day}T09:00`);
  await detail.getByRole('button', { name: 'Set override' }).click();
  await detail.getByText('Stage set to onboarding.').waitFor();
  const set = (await call(k.read, 'GET', '/v1/customers/h_3/health')).body;
  assert.equal(set.stage, 'onboarding');
  assert.equal(set.stage_reason, 'override');
  assert.equal(set.override.reason, 'kickoff call');
  assert.equal(Date.parse(set.override.until), Date.parse(`${day}T00:00:00Z`));
  await detail.getByText('Stage onboarding: set by hand (override).').waitFor();
  assert.equal(await detail.locator('dd[data-kv="col_stage"]').textContent(), 'onboarding');
  // onboarding's scorecard has logins only: seats is listed apart.
  const whyRows = await bodyRows(detail.getByRole('table', { name: 'Why this score' }));
  assert.deepEqual(whyRows.map((r) => [r[0].split(' ')[0], r[6].startsWith('not in this stage')]), [['logins_7d', false], ['seats', true]]);
  assert.equal(await lift.isEnabled(), true);
  await lift.click();
  await detail.getByText('Override lifted: the rules decide the stage again.').waitFor();
  const lifted = (await call(k.read, 'GET', '/v1/customers/h_3/health')).body;
  assert.equal(lifted.stage, 'adoption');
  assert.equal(lifted.stage_reason, 'rule');
  assert.equal(lifted.override, null);
  await detail.getByText('Stage adoption: the first stage whose rule holds.').waitFor();
  await context.close();

  const ro = await newPage();
  await ro.page.goto(server.url + '/#customer=h_3');
  await signIn(ro.page, k.read);
  const form = ro.page.getByRole('form', { name: 'Stage override' });
  await form.waitFor();
  for (const control of [form.getByLabel('Override stage'), form.getByRole('button', { name: 'Set override' }), form.getByRole('button', { name: 'Lift override' })]) {
    assert.equal(await control.isDisabled(), true);
    assert.match(await control.getAttribute('title'), /admin key/);
    assert.equal(await control.getAttribute('aria-describedby'), 'readonly-note');
  }
  await ro.context.close();
});

test('customers: "More" reads the next page by the API\'s next_cursor, in priority order', { skip }, async () => {
  const k = await healthWorkspace();
  // 52 more customers with one login each: 55 in all, more than a page of 50.
  const events = Array.from({ length: 52 }, (_, i) => ({ id: `p-${i}`, type: 'login', customer_id: `p_${String(i).padStart(2, '0')}` }));
  assert.equal((await call(k.admin, 'POST', '/v1/events', events)).status, 200);
  await until('55 customers with a score', async () => (await byPriority(k.read, '&limit=1000')).length === 55);
  const all = (await byPriority(k.read, '&limit=1000')).map((c) => c.customer_id);
  // The API's own pages agree with the whole list.
  const first = (await call(k.read, 'GET', '/v1/customers?sort=priority&limit=50')).body;
  assert.ok(first.next_cursor);
  const second = (await call(k.read, 'GET', `/v1/customers?sort=priority&limit=50&cursor=${encodeURIComponent(first.next_cursor)}`)).body;
  assert.deepEqual(first.data.concat(second.data).map((c) => c.customer_id), all);
  const { context, page } = await newPage();
  await signIn(page, k.read);
  const region = customersRegion(page);
  const list = region.getByRole('table', { name: 'Customers', exact: true });
  await until('the first page', async () => (await bodyRows(list)).map((r) => r[0]).join() === all.slice(0, 50).join());
  await region.getByText('50 customers, more on the server').waitFor();
  await region.getByRole('button', { name: 'More' }).click();
  await until('both pages', async () => (await bodyRows(list)).map((r) => r[0]).join() === all.join());
  await region.getByText('55 customers', { exact: true }).waitFor();
  assert.equal(await region.getByRole('button', { name: 'More' }).isHidden(), true);
  await context.close();
});

// ---- Overview, settings, saved queries, navigation, first load ---------------

// A workspace of its own with admin and read keys.
async function ownWorkspace(name) {
  const ws = await call(server.root, 'POST', '/v1/workspaces', { name, time_zone: 'Asia/Tokyo' });
  assert.equal(ws.status, 201, JSON.stringify(ws.body));
  const k = {};
  for (const scope of ['admin', 'read', 'ingest']) {
    const r = await call(server.root, 'POST', '/v1/keys', { name: `${name} ${scope}`, scope, workspace: name });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    k[scope] = r.body.secret;
  }
  return k;
}
const overviewRegion = (page) => page.getByRole('region', { name: 'Overview', exact: true });
const tileValue = (page, name) => overviewRegion(page).getByRole('group', { name, exact: true }).locator('.value').textContent();
const seriesValues = (page, series) => overviewRegion(page).locator(`svg[data-series="${series}"]`).getAttribute('data-values', { timeout: 2_000 })
  .then((v) => v.split(',').map(Number)).catch(() => []);
const sum = (xs) => xs.reduce((a, b) => a + b, 0);

test('overview: the figures now and the charts of the last hour equal the API, and count only this workspace', { skip }, async () => {
  const k = await ownWorkspace('ovw');
  const hook = await call(k.admin, 'POST', '/v1/webhooks', { url: 'http://127.0.0.1:9/hook', event_types: ['ovw.dead'] });
  assert.equal(hook.status, 201, JSON.stringify(hook.body));
  const events = Array.from({ length: 12 }, (_, i) => ({ id: `ovw-${i}`, type: i < 2 ? 'ovw.dead' : 'ovw.ok' }));
  assert.equal((await call(k.ingest, 'POST', '/v1/events', events)).status, 200);
  assert.equal((await call(k.ingest, 'POST', '/v1/events', { id: '', type: 'x' })).status, 400);
  const settled = (o) => o.events_last_hour === 12 && o.dead_letters_waiting === 2 && o.errors_last_hour === 3;
  const api = await until('the overview counted it all', async () => { const o = (await call(k.read, 'GET', '/v1/overview')).body; return settled(o) && o; });
  assert.deepEqual(api.errors, { ingest_rejected: 1, jobs_failed: 0, dead_lettered: 2 });

  const { context, page } = await newPage();
  await signIn(page, k.read);
  // The page reads the overview every few seconds; wait until its charts
  // hold every sample of the activity, then compare with the API.
  await until('the charts of the page', async () => sum(await seriesValues(page, 'events')) === 12 && sum(await seriesValues(page, 'errors')) === 3, 20_000);
  assert.equal(await tileValue(page, 'Dead letters waiting'), '2');
  assert.equal(await tileValue(page, 'Errors in the last hour'), '3');
  assert.equal(await tileValue(page, 'Jobs running'), '0');
  await overviewRegion(page).getByText('1 refused request · 0 failed jobs · 2 dead letters').waitFor();
  // Every chart is an image with a name saying what it shows and the value now.
  for (const name of [/^Events accepted per sample: \d+ samples from .* now /, /^Largest consumer lag: /, /^Jobs running: /, /^Dead letters waiting: .* now 2$/, /^Errors per sample: .* now 3$/]) {
    await overviewRegion(page).getByRole('img', { name }).waitFor();
  }
  // The consumers table lists what GET /v1/consumers lists for this workspace.
  const consumers = (await call(k.read, 'GET', '/v1/consumers')).body.data.map((c) => c.name).sort();
  const shown = await overviewRegion(page).getByRole('table', { name: 'Consumer lags' }).evaluate((t) => [...t.tBodies[0].rows].map((r) => r.cells[0].textContent.trim()));
  assert.deepEqual(shown.sort(), consumers);
  assert.ok(shown.includes(hook.body.consumer));
  // The series the page drew are the API's.
  const again = (await call(k.read, 'GET', '/v1/overview')).body;
  assert.equal(sum(again.series.map((p) => p.events)), sum(await seriesValues(page, 'events')));
  assert.equal(sum(again.series.map((p) => p.errors)), sum(await seriesValues(page, 'errors')));
  await axeCheck(page, 'overview');
  // In Japanese.
  await page.getByLabel('Language').selectOption('ja');
  const ja = page.getByRole('region', { name: '概要', exact: true });
  await ja.getByRole('group', { name: '処理待ちのデッドレター' }).waitFor();
  await ja.getByRole('img', { name: /^サンプルごとのエラー数: .*。現在 3$/ }).waitFor();
  await page.getByLabel('Language').selectOption('en');
  await context.close();
});

test('settings: an admin creates a key whose secret is shown once and works, revokes it after confirming, adds and deletes a webhook', { skip }, async () => {
  const k = await ownWorkspace('setg');
  const { context, page } = await newPage();
  await signIn(page, k.admin);
  const settings = page.getByRole('region', { name: 'Settings', exact: true });
  await settings.getByRole('table', { name: 'Workspaces' }).getByText('setg').waitFor();
  // The keys table is the API's list.
  const keysTable = settings.getByRole('table', { name: 'Access keys' });
  await keysTable.waitFor();
  const listed = (await call(k.admin, 'GET', '/v1/keys')).body.data.map((x) => x.id).sort();
  assert.deepEqual((await keysTable.evaluate((t) => [...t.tBodies[0].rows].map((r) => r.cells[0].textContent.trim()))).sort(), listed);
  // A key without a name is refused at the control, nothing created.
  await settings.getByRole('button', { name: 'Create key' }).click();
  await settings.getByText('Give the key a name.').waitFor();
  assert.equal((await call(k.admin, 'GET', '/v1/keys')).body.data.length, listed.length);
  // Create: the secret is shown once, and works.
  await settings.getByLabel('Key name').fill('reporting');
  await settings.getByLabel('Scope', { exact: true }).selectOption('read');
  await settings.getByRole('button', { name: 'Create key' }).click();
  const secretBox = settings.getByRole('region', { name: 'Copy the secret now: it is shown only once.' });
  await secretBox.waitFor();
  const secret = (await secretBox.locator('code').textContent()).trim();
  assert.match(secret, /^sk_/);
  assert.equal((await call(secret, 'GET', '/v1/consumers')).status, 200);
  const created = (await call(k.admin, 'GET', '/v1/keys')).body.data.find((x) => x.name === 'reporting');
  assert.equal(created.scope, 'read');
  await keysTable.getByText(created.id).waitFor();
  // After a reload the secret is nowhere on the page.
  await page.reload();
  await page.getByRole('button', { name: 'Sign out' }).waitFor();
  await keysTable.getByText(created.id).waitFor();
  assert.equal((await page.content()).includes(secret), false);
  // Revoke asks first; Back changes nothing, Confirm revokes.
  const row = keysTable.getByRole('row').filter({ hasText: created.id });
  await row.getByRole('button', { name: 'Revoke' }).click();
  await settings.getByRole('alert').getByText(`Revoke ${created.id}?`).waitFor();
  await settings.getByRole('button', { name: 'Back' }).click();
  assert.equal((await call(secret, 'GET', '/v1/consumers')).status, 200);
  await row.getByRole('button', { name: 'Revoke' }).click();
  await settings.getByRole('button', { name: 'Confirm' }).click();
  await settings.getByText(`Key ${created.id} revoked.`).waitFor();
  assert.equal((await call(secret, 'GET', '/v1/consumers')).status, 401);
  await until('the key leaves the table', async () => (await keysTable.getByText(created.id).count()) === 0);
  // Webhooks: add (the signing secret shown once), then delete after confirming.
  await settings.getByLabel('Target URL').fill('http://127.0.0.1:9/sluice-setg');
  await settings.getByLabel('Event types (comma-separated; * for all)').fill('invoice.finalized, customer.stage_changed');
  await settings.getByRole('button', { name: 'Add webhook' }).click();
  await settings.getByRole('region', { name: "The webhook's signing secret, shown only once:" }).waitFor();
  const hooks = (await call(k.admin, 'GET', '/v1/webhooks')).body.data;
  assert.equal(hooks.length, 1);
  assert.deepEqual(hooks[0].event_types, ['invoice.finalized', 'customer.stage_changed']);
  const hooksTable = settings.getByRole('table', { name: 'Webhooks' });
  await hooksTable.getByText('http://127.0.0.1:9/sluice-setg').waitFor();
  await hooksTable.getByRole('row').filter({ hasText: 'sluice-setg' }).getByRole('button', { name: 'Delete' }).click();
  await settings.getByRole('button', { name: 'Confirm' }).click();
  await until('the webhook is deleted', async () => (await call(k.admin, 'GET', '/v1/webhooks')).body.data.length === 0);
  await until('the webhook leaves the table', async () => (await hooksTable.getByText('sluice-setg').count()) === 0);
  await axeCheck(page, 'settings');
  // The sign-in is in the audit trail.
  const audit = (await call(k.admin, 'GET', '/v1/audit?limit=1000')).body.data.map((e) => e.action);
  for (const a of ['session.create', 'key.create', 'key.revoke']) assert.ok(audit.includes(a), `${a} in ${audit}`);
  await context.close();

  // A read key sees the keys as admin-only and every control disabled, with the reason.
  const ro = await newPage();
  await signIn(ro.page, k.read);
  const roSettings = ro.page.getByRole('region', { name: 'Settings', exact: true });
  await roSettings.getByText('Only admin keys can list and create API keys.').waitFor();
  for (const control of [roSettings.getByRole('button', { name: 'Create key' }), roSettings.getByLabel('Key name'), roSettings.getByRole('button', { name: 'Add webhook' }), roSettings.getByLabel('Target URL')]) {
    assert.equal(await control.isDisabled(), true);
    assert.match(await control.getAttribute('title'), /Read-only key/);
    assert.match(await control.getAttribute('aria-describedby'), /readonly-note/);
  }
  await axeCheck(ro.page, 'settings (read key)');
  await ro.context.close();
});

test('sql: save a query with a schedule, open it, run it now as a job, delete it; a bad schedule is refused at the control', { skip }, async () => {
  const k = await ownWorkspace('sqls');
  assert.equal((await call(k.ingest, 'POST', '/v1/events', [{ id: 's-1', type: 'a' }, { id: 's-2', type: 'a' }, { id: 's-3', type: 'b' }])).status, 200);
  const { context, page } = await newPage();
  await signIn(page, k.admin);
  const sql = page.getByRole('region', { name: 'SQL', exact: true });
  const text = "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type";
  await sql.getByLabel('Query').fill(text);
  await sql.getByLabel('Save as (name)').fill('types');
  await sql.getByLabel('Schedule (cron, UTC; empty: none)').fill('not a cron');
  await sql.getByRole('button', { name: 'Save', exact: true }).click();
  await sql.locator('#query-msg.msg').getByText(/schedule/).waitFor();
  assert.equal((await call(k.admin, 'GET', '/v1/queries/types')).status, 404);
  await sql.getByLabel('Schedule (cron, UTC; empty: none)').fill('0 * * * *');
  await sql.getByRole('button', { name: 'Save', exact: true }).click();
  await sql.getByText('Saved as types.').waitFor();
  const saved = (await call(k.admin, 'GET', '/v1/queries/types')).body;
  assert.equal(saved.sql, text);
  assert.equal(saved.schedule, '0 * * * *');
  const table = sql.getByRole('table', { name: 'Saved queries' });
  const row = table.getByRole('row').filter({ hasText: 'types' });
  await row.getByText('0 * * * *').waitFor();
  // Open: the text comes back into the editor and runs.
  await sql.getByLabel('Query').fill('SELECT 1');
  await row.getByRole('button', { name: 'Open' }).click();
  assert.equal(await sql.getByLabel('Query').inputValue(), text);
  const result = sql.getByRole('table', { name: 'Query result' });
  await result.getByText('b', { exact: true }).waitFor();
  assert.deepEqual(await result.evaluate((t) => [...t.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent))), [['a', '2'], ['b', '1']]);
  // Run now: a job, as the API lists it.
  await row.getByRole('button', { name: 'Run now' }).click();
  const msg = await sql.getByText(/^types runs as job job_/).textContent();
  const id = msg.match(/job_[A-Za-z0-9]+/)[0];
  const job = (await call(k.admin, 'GET', `/v1/jobs/${id}`)).body;
  assert.equal(job.id, id);
  await until('the query job ends', async () => (await call(k.admin, 'GET', `/v1/jobs/${id}`)).body.status === 'succeeded');
  // Delete asks first.
  await row.getByRole('button', { name: 'Delete' }).click();
  await sql.getByRole('button', { name: 'Confirm' }).click();
  await sql.getByText('Deleted types.').waitFor();
  assert.equal((await call(k.admin, 'GET', '/v1/queries/types')).status, 404);
  await axeCheck(page, 'sql with saved queries');
  await context.close();
  // A read key can open and run saved queries in the editor, not save, run as a job or delete.
  assert.equal((await call(k.admin, 'POST', '/v1/queries', { name: 'kept', sql: 'SELECT 2 AS two' })).status, 201);
  const ro = await newPage();
  await signIn(ro.page, k.read);
  const roSql = ro.page.getByRole('region', { name: 'SQL', exact: true });
  const roRow = roSql.getByRole('table', { name: 'Saved queries' }).getByRole('row').filter({ hasText: 'kept' });
  await roRow.waitFor();
  for (const b of ['Run now', 'Delete']) assert.equal(await roRow.getByRole('button', { name: b }).isDisabled(), true);
  assert.equal(await roSql.getByRole('button', { name: 'Save', exact: true }).isDisabled(), true);
  await roRow.getByRole('button', { name: 'Open' }).click();
  await roSql.getByRole('table', { name: 'Query result' }).getByText('2', { exact: true }).waitFor();
  await ro.context.close();
});

test('navigation: a link to every section; the first load is small and quick (Navigation Timing)', { skip }, async () => {
  const { context, page } = await newPage({ viewport: { width: 1280, height: 800 } });
  // The first load: the page itself is the only request before sign-in.
  const nav = await page.evaluate(() => { const n = performance.getEntriesByType('navigation')[0]; return { transfer: n.transferSize, encoded: n.encodedBodySize, decoded: n.decodedBodySize, interactive: n.domInteractive, loaded: n.loadEventEnd }; });
  // Nothing but the page and the API: no scripts, styles, fonts or images from anywhere.
  const resources = await page.evaluate(() => performance.getEntriesByType('resource').map((r) => r.name));
  for (const r of resources) assert.ok(r.startsWith(server.url + '/v1/'), `the first load fetched ${r}`);
  assert.ok(nav.transfer <= 300 * 1024, `first load ${nav.transfer} bytes`);
  assert.ok(nav.encoded < nav.decoded, `the page is sent compressed: ${JSON.stringify(nav)}`);
  console.log(`# first load: ${nav.transfer} bytes transferred (${nav.encoded} compressed, ${nav.decoded} uncompressed), DOM interactive at ${Math.round(nav.interactive)} ms, load event at ${Math.round(nav.loaded)} ms`);
  await signIn(page, keys.admin);
  const navigation = page.getByRole('navigation', { name: 'Sections' });
  const targets = { Overview: 'Overview', Imports: 'Imports', Billing: 'Billing', Jobs: 'Jobs', 'Dead letters': 'Dead letters', SQL: 'SQL', Customers: 'Customers', 'Meters and usage': 'Meters and usage', Events: 'Events', Settings: 'Settings' };
  for (const [link, region] of Object.entries(targets)) {
    await navigation.getByRole('link', { name: link, exact: true }).click();
    const box = await page.getByRole('region', { name: region, exact: true }).boundingBox();
    assert.ok(box && box.y < 800 && box.y + box.height > 0, `${link}: the section is in view (${JSON.stringify(box)})`);
  }
  // Keyboard: Tab from the language switch reaches the section links.
  await page.getByLabel('Language').focus();
  let reached = false;
  for (let i = 0; i < 4 && !reached; i++) {
    await page.keyboard.press('Tab');
    reached = await page.evaluate(() => document.activeElement?.closest('nav') !== null && document.activeElement?.tagName === 'A');
  }
  assert.ok(reached, 'the section links are reachable by keyboard');
  // A tablet: nothing wider than the screen.
  await page.setViewportSize({ width: 768, height: 1024 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 0, `the page is ${overflow} px wider than a 768 px tablet`);
  await axeCheck(page, 'the whole signed-in page (admin)');
  await context.close();
});

test('lists update live over Server-Sent Events instead of polling every list every 2 s', { skip }, async () => {
  // A workspace of its own: nothing else changes its jobs or dead letters
  // while the test counts reads (acme's webhook dead-letters other tests' events).
  const k = await ownWorkspace('live');
  const { context, page } = await newPage();
  const reads = [];
  page.on('request', (r) => reads.push({ path: new URL(r.url()).pathname, at: Date.now() }));
  await signIn(page, k.read);
  const jobs = page.getByRole('region', { name: 'Jobs' });
  await jobs.waitFor();
  await until('the live stream', async () => reads.some((r) => r.path === '/v1/live'));
  // Let the page settle, then count how often it reads the jobs list while
  // nothing changes: the 5 s fallback, not every 2 s.
  await new Promise((r) => setTimeout(r, 2_000));
  const from = Date.now();
  await new Promise((r) => setTimeout(r, 6_500));
  const idle = reads.filter((r) => r.path === '/v1/jobs' && r.at >= from).length;
  assert.ok(idle <= 2, `the jobs list was read ${idle} times in 6.5 s with nothing new`);
  // A new job appears without waiting for the fallback.
  const created = Date.now();
  const job = await call(k.admin, 'POST', '/v1/lake/compact');
  assert.equal(job.status, 202, JSON.stringify(job.body));
  await jobs.getByText(job.body.id, { exact: true }).first().waitFor({ timeout: 15_000 });
  const after = reads.filter((r) => r.path === '/v1/jobs' && r.at >= created);
  console.log(`# a new job was shown ${Date.now() - created} ms after it was created (${after.length} reads of the jobs list)`);
  // Hidden tabs stop the stream and the refreshes.
  await page.evaluate(() => { Object.defineProperty(document, 'hidden', { value: true, configurable: true }); document.dispatchEvent(new Event('visibilitychange')); });
  const hiddenFrom = Date.now();
  await new Promise((r) => setTimeout(r, 3_000));
  assert.deepEqual(reads.filter((r) => r.at >= hiddenFrom + 200 && r.path.startsWith('/v1/')).map((r) => r.path), []);
  await context.close();
});

test('jobs and dead letters: "More" reads the next page by the API\'s next_cursor', { skip }, async () => {
  const k = await ownWorkspace('pages');
  for (let i = 0; i < 25; i++) assert.equal((await call(k.admin, 'POST', '/v1/lake/compact')).status, 202);
  const hook = await call(k.admin, 'POST', '/v1/webhooks', { url: 'http://127.0.0.1:9/hook', event_types: ['pg.dead'] });
  assert.equal(hook.status, 201, JSON.stringify(hook.body));
  assert.equal((await call(k.ingest, 'POST', '/v1/events', Array.from({ length: 55 }, (_, i) => ({ id: `pg-${i}`, type: 'pg.dead' })))).status, 200);
  await until('55 dead letters', async () => (await call(k.read, 'GET', '/v1/dlq?status=dead&limit=1000')).body.data.length === 55);
  await until('the compactions end', async () => (await call(k.read, 'GET', '/v1/jobs?limit=1000')).body.data.every((j) => j.status === 'succeeded'));
  const apiJobs = (await call(k.read, 'GET', '/v1/jobs?order=desc&limit=1000')).body.data.map((j) => j.id);
  const apiDlq = (await call(k.read, 'GET', '/v1/dlq?status=dead&limit=1000')).body.data.map((d) => d.event_id);
  assert.equal(apiJobs.length, 25);
  const { context, page } = await newPage();
  await signIn(page, k.read);
  const idsOf = (table, col) => table.evaluate((t, c) => [...t.tBodies[0].rows].map((r) => r.cells[c].textContent.trim()), col);
  const jobs = page.getByRole('region', { name: 'Jobs', exact: true });
  const jobsTable = jobs.getByRole('table', { name: 'Jobs' });
  await jobs.getByText('20 shown, more on the server').waitFor();
  const idCol = await jobsTable.evaluate((t) => [...t.tHead.rows[0].cells].findIndex((c) => c.textContent.trim() === 'id'));
  assert.deepEqual((await idsOf(jobsTable, idCol)).map((s) => s.match(/job_[A-Za-z0-9]+/)[0]), apiJobs.slice(0, 20));
  await jobs.getByRole('button', { name: 'More', exact: true }).click();
  await jobs.getByText('25 shown').waitFor();
  assert.deepEqual((await idsOf(jobsTable, idCol)).map((s) => s.match(/job_[A-Za-z0-9]+/)[0]), apiJobs);
  assert.equal(await jobs.getByRole('button', { name: 'More', exact: true }).isHidden(), true);
  const dlq = page.getByRole('region', { name: 'Dead letters', exact: true });
  const dlqTable = dlq.getByRole('table', { name: 'Dead letters' });
  await dlq.getByText('50 shown, more on the server').waitFor();
  const evCol = await dlqTable.evaluate((t) => [...t.tHead.rows[0].cells].findIndex((c) => c.textContent.trim() === 'event'));
  assert.deepEqual(await idsOf(dlqTable, evCol), apiDlq.slice(0, 50));
  await dlq.getByRole('button', { name: 'More', exact: true }).click();
  await dlq.getByText('55 shown').waitFor();
  assert.deepEqual(await idsOf(dlqTable, evCol), apiDlq);
  await context.close();
});

test('billing: usage no subscription bills is listed with the reason in words, as the API says; in Japanese too', { skip }, async () => {
  const k = await ownWorkspace('unbilled');
  assert.equal((await call(k.admin, 'POST', '/v1/meters', { key: 'api_units', event_type: 'api.unit', aggregation: 'sum', value_property: 'n' })).status, 201);
  const plan = await call(k.admin, 'POST', '/v1/plans', {
    code: 'metered', name: 'Metered', currency: 'JPY', interval: 'month', charges: [{ meter: 'api_units', model: 'per_unit', unit_price: '2', tax_rate: '0.10' }],
  });
  assert.equal(plan.status, 201, JSON.stringify(plan.body));
  const start = new Date(Date.now() - 2 * 3600_000).toISOString();
  const subs = await call(k.admin, 'POST', '/v1/subscriptions', ['u-1', 'u-2'].map((id) => ({ id, customer_id: 'cus_two', plan: 'metered', start })));
  assert.equal(subs.status, 201, JSON.stringify(subs.body));
  const at = new Date(Date.now() - 3600_000).toISOString();
  assert.equal((await call(k.ingest, 'POST', '/v1/events', [
    { id: 'ua-1', type: 'api.unit', customer_id: 'cus_two', timestamp: at, properties: { n: 5 } },
    { id: 'ua-2', type: 'api.unit', customer_id: 'cus_none', timestamp: at, properties: { n: 3 } },
    { id: 'ua-3', type: 'api.unit', customer_id: 'cus_two', subscription_id: 'u-1', timestamp: at, properties: { n: 7 } },
  ])).status, 200);
  const report = await until('the report', async () => {
    const r = await call(k.read, 'GET', '/v1/billing/unattributed-usage');
    return r.body.data?.length === 2 ? r.body.data : null;
  });
  const { context, page } = await newPage();
  await signIn(page, k.read);
  const region = page.getByRole('region', { name: 'Billing', exact: true });
  const table = region.getByRole('table', { name: 'Usage no subscription bills' });
  await table.waitFor();
  const rows = await table.evaluate((t) => [...t.tBodies[0].rows].map((r) => [...r.cells].slice(0, 5).map((c) => c.textContent)));
  assert.deepEqual(rows, [
    ['cus_none', 'api_units', 'no subscription of the customer charges this meter then', '3', '1'],
    ['cus_two', 'api_units', 'several subscriptions charge this meter (u-1, u-2): the events must name one', '5', '1'],
  ]);
  assert.deepEqual(rows.map((r) => [r[0], r[3]]), report.map((u) => [u.customer_id, u.quantity]));
  await axeCheck(page, 'unattributed usage');
  await page.getByLabel('Language').selectOption('ja');
  await page.getByRole('region', { name: '請求', exact: true }).getByRole('table', { name: 'どのサブスクリプションにも請求されない使用量' }).getByText('複数のサブスクリプション (u-1, u-2) がこのメーターを課金しています。イベントでどれか一つを指定してください').waitFor();
  await context.close();
});
