// Starts `sluice serve` for the browser tests (both suites): port 0, the
// caller's data dir, and waits until /healthz answers.
//
// The address is read only from a whole line (up to its newline): stderr can
// arrive split anywhere, and four CI runs read a chunk that ended inside the
// address ("http://127" or a port cut short) and then had every connection
// refused by a server that was fine. Should a server still not answer within
// 15 s, it is reported with what the kernel says — whether anything listens on
// the port, the process's state, threads and open files — killed, and a second
// one is started. A second failure fails the test with both reports.

import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';

const ANSWER_WITHIN_MS = 15_000;

// Spawns the server; resolves { url, child, log } once it printed its address.
function spawnSluice(bin, dataDir, env) {
  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`sluice serve did not start in 60 s:\n${log}`)), 60_000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      log += chunk;
      const m = log.match(/sluice listening on (http:\/\/\S+)\r?\n/);
      if (m) { clearTimeout(timer); resolve({ url: m[1], child, log: () => log }); }
    });
    child.on('exit', (code, signal) => { clearTimeout(timer); reject(new Error(`sluice serve exited (code ${code}, signal ${signal}):\n${log}`)); });
  });
}

// What /proc says about a port and a process (Linux; empty elsewhere).
export function diagnose(port, pid) {
  const facts = [];
  const hex = Number(port).toString(16).toUpperCase().padStart(4, '0');
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    if (!existsSync(table)) continue;
    const rows = readFileSync(table, 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/)).filter((f) => f.length > 3);
    const states = rows.filter((f) => f[1].endsWith(`:${hex}`)).map((f) => f[3]);
    const listening = states.filter((s) => s === '0A').length;
    facts.push(`${table}: ${listening} LISTEN socket(s) on port ${port}, ${states.length - listening} other local socket(s) on it`);
  }
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const field = (name) => status.match(new RegExp(`^${name}:\\s*(.*)$`, 'm'))?.[1];
    facts.push(`process ${pid}: state ${field('State')}, ${field('Threads')} threads, ${readdirSync(`/proc/${pid}/fd`).length} open files`);
  } catch (e) {
    facts.push(`process ${pid}: ${e.message}`);
  }
  return facts.join('; ');
}

// Starts a server that answers /healthz; see the module comment.
export async function startSluice(bin, { dataDir, env = {} }) {
  const reports = [];
  for (let attempt = 1; attempt <= 2; attempt++) {
    const s = await spawnSluice(bin, `${dataDir}${attempt > 1 ? `-${attempt}` : ''}`, env);
    const end = Date.now() + ANSWER_WITHIN_MS;
    let why = '';
    while (Date.now() < end) {
      if (s.child.exitCode !== null || s.child.signalCode !== null) { why = `it exited (code ${s.child.exitCode}, signal ${s.child.signalCode})`; break; }
      try {
        if ((await fetch(`${s.url}/healthz`)).ok) return s;
        why = 'healthz did not answer 200';
      } catch (e) {
        why = `${e.message} (${e.cause?.code ?? e.cause?.message ?? 'no cause'})`;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    const report = `the sluice server at ${s.url} (start ${attempt}) does not answer: ${why}; ${diagnose(new URL(s.url).port, s.child.pid)}; its log:\n${s.log()}`;
    console.log(`# ${report.replaceAll('\n', '\n# ')}`);
    reports.push(report);
    s.child.kill('SIGKILL');
  }
  throw new Error(`sluice serve does not answer after 2 starts:\n${reports.join('\n')}`);
}
