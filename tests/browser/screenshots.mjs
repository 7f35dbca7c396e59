// Takes the screenshots in docs/dashboard.md: one PNG per section of the
// dashboard, at 1280 px, after putting some data in a fresh server (a meter,
// imports with and without bad rows, events, dead letters, a plan with
// billed subscriptions, a health configuration, a saved query). Not part of
// the test suite (node --test runs *.test.mjs).
//
// Run: SLUICE_BIN=$CARGO_TARGET_DIR/debug/sluice node tests/browser/screenshots.mjs

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const docs = path.join(here, '../../docs');
const bin = process.env.SLUICE_BIN
  || path.join(process.env.CARGO_TARGET_DIR || path.join(homedir(), '.cache/sluice/target'), 'debug/sluice');
const dir = mkdtempSync(path.join(tmpdir(), 'sluice-shot-'));
const root = 'sk_' + randomBytes(32).toString('base64url');
const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dir], {
  env: {
    ...process.env, SLUICE_BOOTSTRAP_KEY: root, RUST_LOG: 'warn', SLUICE_DASHBOARD_OVERVIEW_INTERVAL: '1s',
    SLUICE_WEBHOOK_ALLOW_PRIVATE: 'true', SLUICE_RETRY_ATTEMPTS: '1', SLUICE_RETRY_BASE_MS: '20',
  },
  stdio: ['ignore', 'ignore', 'pipe'],
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let browser;
try {
  let stderr = '';
  const url = await new Promise((resolve, reject) => {
    child.stderr.on('data', (c) => { stderr += c; const m = stderr.match(/sluice listening on (http:\/\/\S+)\r?\n/); if (m) resolve(m[1]); });
    child.on('exit', () => reject(new Error(stderr)));
  });
  const call = async (key, method, p, body) => (await fetch(url + p, {
    method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: body && JSON.stringify(body),
  })).json();
  await call(root, 'POST', '/v1/workspaces', { name: 'acme', time_zone: 'Asia/Tokyo' });
  const admin = (await call(root, 'POST', '/v1/keys', { name: 'screenshot', scope: 'admin', workspace: 'acme' })).secret;
  await call(admin, 'POST', '/v1/meters', { key: 'gb', event_type: 'storage.used', aggregation: 'sum', value_property: 'gb' });
  await call(admin, 'POST', '/v1/webhooks', { url: 'http://127.0.0.1:9/hook', event_types: ['order.paid'] });
  const day = 86_400_000;
  const events = [];
  for (let d = 0; d < 14; d++) {
    for (const [c, gb] of [['cus_acme', 3 + (d % 5)], ['cus_beta', 1 + (d % 3)], ['cus_kappa', 2]]) {
      events.push({ id: `u-${c}-${d}`, type: 'storage.used', customer_id: c, timestamp: new Date(Date.now() - d * day).toISOString(), properties: { gb } });
    }
    for (const c of ['cus_acme', 'cus_beta', 'cus_beta', 'cus_kappa']) events.push({ id: `l-${c}-${d}-${events.length}`, type: 'login', customer_id: c, timestamp: new Date(Date.now() - d * day - 3600_000).toISOString() });
  }
  events.push({ id: 'o-1', type: 'order.paid', customer_id: 'cus_acme', properties: { amount: '12000', currency: 'JPY' } });
  events.push({ id: 'o-2', type: 'order.paid', customer_id: 'cus_beta', properties: { amount: '5400', currency: 'JPY' } });
  await call(admin, 'POST', '/v1/events', events);
  await call(admin, 'POST', '/v1/group', { userId: 'u-1', groupId: 'cus_acme', traits: { name: 'Acme 株式会社', mrr: 120000, seats: 40 } });
  await call(admin, 'POST', '/v1/group', { userId: 'u-2', groupId: 'cus_beta', traits: { name: 'Beta Inc.', mrr: 54000, seats: 3 } });
  await call(admin, 'POST', '/v1/group', { userId: 'u-3', groupId: 'cus_kappa', traits: { name: 'Kappa', mrr: 8000, seats: 12 } });
  await call(admin, 'PUT', '/v1/health/config', {
    measures: { logins_7d: { kind: 'count', event_type: 'login', days: 7 }, seats: { kind: 'attribute', attribute: 'seats' } },
    stages: [{ name: 'adoption', rule: { all: [] } }],
    scorecards: { adoption: [{ measure: 'logins_7d', weight: 2, linear: { from: 0, to: 14 } }, { measure: 'seats', weight: 1, linear: { from: 0, to: 50 } }] },
    bands: { good: 70, bad: 40 },
  });
  await call(admin, 'POST', '/v1/plans', {
    code: 'basic', name: 'Basic', currency: 'JPY', interval: 'month', fixed_fees: [{ name: 'Base', amount: '3000', tax_rate: '0.10' }],
    charges: [{ meter: 'gb', model: 'per_unit', unit_price: '12', tax_rate: '0.10' }],
  });
  const start = new Date(Date.now() - 2 * 3600_000).toISOString();
  await call(admin, 'POST', '/v1/subscriptions', ['cus_acme', 'cus_beta', 'cus_kappa'].map((c, i) => ({ id: `sub-${i + 1}`, customer_id: c, plan: 'basic', start })));
  await call(admin, 'POST', '/v1/billing-runs?wait=true', { subscriptions: ['sub-1', 'sub-2'], until: 'now' });
  await call(admin, 'POST', '/v1/queries', { name: 'events_by_customer', sql: 'SELECT customer_id, type, count(*) AS n FROM events GROUP BY customer_id, type ORDER BY n DESC', schedule: '0 0 * * *' });

  browser = await chromium.launch({ executablePath: process.env.SLUICE_CHROMIUM || '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu'] });
  const page = await (await browser.newContext({ timezoneId: 'Asia/Tokyo', locale: 'en-US', viewport: { width: 1280, height: 900 } })).newPage();
  await page.goto(url + '/');
  await page.getByLabel('API key').fill(admin);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('button', { name: 'Sign out' }).waitFor();
  const upload = async (name, text, mode, done) => {
    await page.getByLabel('or choose a CSV file', { exact: true }).setInputFiles({ name, mimeType: 'text/csv', buffer: Buffer.from(text) });
    await page.getByLabel('Mode', { exact: true }).selectOption(mode);
    await page.getByRole('button', { name: 'Upload', exact: true }).click();
    await done.waitFor();
  };
  const detail = page.getByRole('region', { name: /^Import job_/ });
  await upload('usage-2024-01.csv', 'customer_id,meter,timestamp,quantity\nacme,gb,2024-01-01,12.5\nacme,gb,2024-01-02,3\n', 'strict',
    page.getByRole('table', { name: 'Past imports' }).getByText('succeeded'));
  await upload('usage-2024-02.csv', 'customer_id,subscription_id,meter,timestamp,quantity\n'
    + 'acme,sub-1,gb,2024-02-01,12.5\n'
    + 'acme,sub-1,storage,2024-02-10T10:00:00Z,2.5\n'
    + '"Beta, Inc.",,gb,yesterday,x\n'
    + 'acme,sub-1,gb,2024-02-11T10:00:00Z,1.5e3\n', 'strict',
    detail.getByRole('table', { name: 'Row errors' }));
  // A few samples for the overview's charts, and live events.
  for (let i = 0; i < 8; i++) {
    await call(admin, 'POST', '/v1/events', Array.from({ length: 20 + 15 * i }, (_, j) => ({ id: `live-${i}-${j}`, type: 'page.viewed', customer_id: 'cus_acme' })));
    await sleep(1000);
  }
  await page.getByRole('region', { name: 'Meters and usage' }).getByRole('button', { name: 'Show' }).click();
  await page.getByRole('link', { name: 'cus_acme', exact: true }).first().click();
  await page.getByRole('region', { name: /^Customer cus_acme/ }).waitFor();
  await page.getByRole('region', { name: 'SQL', exact: true }).getByRole('button', { name: 'Open' }).click();
  await page.getByRole('table', { name: 'Query result' }).waitFor();
  await sleep(2500);
  const shots = {
    overview: '#sec-overview', imports: '#imports', billing: '#billing', jobs: '#sec-jobs', 'dead-letters': '#sec-dlq', sql: '#sec-sql',
    customers: '#customers-section', usage: '#sec-usage', events: '#sec-events', settings: '#sec-settings',
  };
  for (const [name, sel] of Object.entries(shots)) {
    const out = path.join(docs, `dashboard-${name}.png`);
    // A long list is cut at 1,100 px: the top of the section shows it.
    const el = page.locator(sel);
    await el.scrollIntoViewIfNeeded();
    const box = await el.boundingBox();
    if (box.height > 1100) await page.screenshot({ path: out, fullPage: true, clip: { x: box.x, y: box.y + (await page.evaluate(() => window.scrollY)), width: box.width, height: 1100 } });
    else await el.screenshot({ path: out });
    console.log(`wrote ${out}`);
  }
} finally {
  await browser?.close();
  child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
}
