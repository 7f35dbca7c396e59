// Takes docs/dashboard-imports.png: the Imports page after a strict import
// with bad rows. Not part of the test suite (node --test runs *.test.mjs).
//
// Run: SLUICE_BIN=$CARGO_TARGET_DIR/debug/sluice node tests/browser/screenshot-imports.mjs

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.join(here, '../../docs/dashboard-imports.png');
const bin = process.env.SLUICE_BIN
  || path.join(process.env.CARGO_TARGET_DIR || path.join(homedir(), '.cache/sluice/target'), 'debug/sluice');
const dir = mkdtempSync(path.join(tmpdir(), 'sluice-shot-'));
const root = 'sk_' + randomBytes(32).toString('base64url');
const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dir], {
  env: { ...process.env, SLUICE_BOOTSTRAP_KEY: root, RUST_LOG: 'warn' }, stdio: ['ignore', 'ignore', 'pipe'],
});
let browser;
try {
  let stderr = '';
  const url = await new Promise((resolve, reject) => {
    child.stderr.on('data', (c) => { stderr += c; const m = stderr.match(/sluice listening on (http:\/\/\S+)/); if (m) resolve(m[1]); });
    child.on('exit', () => reject(new Error(stderr)));
  });
  const call = async (key, method, p, body) => (await fetch(url + p, {
    method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: body && JSON.stringify(body),
  })).json();
  await call(root, 'POST', '/v1/workspaces', { name: 'acme', time_zone: 'Asia/Tokyo' });
  const admin = (await call(root, 'POST', '/v1/keys', { name: 'screenshot', scope: 'admin', workspace: 'acme' })).secret;
  await call(admin, 'POST', '/v1/meters', { key: 'gb', event_type: 'storage.used', aggregation: 'sum', value_property: 'gb' });

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
  await page.locator('#imports').screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await browser?.close();
  child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
}
