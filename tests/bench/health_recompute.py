#!/usr/bin/env python3
"""Full health recomputes at the issue's size (100,000 customers, 10 million
events) without the ingest: `sluice bench health` needs 30+ minutes to get
there (ingest, the read model, the lake), this a few minutes.

`setup` starts `sluice serve` on DIR/data, creates the Asia/Tokyo workspace
`bench`, an admin key and the bench's first health configuration (which
enables the workspace), stops the server, and writes the health read model's
rows directly into the SQLite state store: one `group` call per customer
(renewal_date, mrr, plan, as the bench sends them) and E events over 90
days with the bench's types and density (`crates/sluice/src/bench/health.rs`).
`run` starts a server on a copy of DIR/data and applies configurations whose
bands change each time, timing each recompute job through the API: the first
inserts every customer's live row, the next ones update them (what the bench's
recomputes do, after live evaluations). It prints the CPU seconds of the
server's threads per recompute (tokio's `sluice` threads, sqlx's SQLite
workers), then times pages of `GET /v1/customers` by priority and score. `PERF=1` records the last recompute with `perf record -g`,
`STRACE=1` counts its system calls (`strace -c`: slow, for counts only);
`SLOG=warn,sqlx::query=debug` logs every statement with its time.

  python3 tests/bench/health_recompute.py setup target/release/sluice /tmp/hr 100000 10000000
  python3 tests/bench/health_recompute.py run target/release/sluice /tmp/hr new 3
  python3 tests/bench/health_recompute.py setup target/release/sluice /tmp/hrpg 100000 10000000 pg

With `pg` last, the state store is a PostgreSQL database (127.0.0.1:5432,
user postgres) `health_harness`, loaded with `\copy` in time order (as the
bench's ingest fills the heap; SQLite's table is clustered by key), never
vacuumed or analyzed (as after the bench's ingest on a server with
autovacuum off); each run works on a copy (`CREATE DATABASE … TEMPLATE`).

What it does not measure: the reference (DuckDB) and the latency, which need
the events in the lake and the log: `sluice bench health` does both.
"""
import json, math, os, random, shutil, signal, socket, sqlite3, subprocess, sys, time, urllib.parse, urllib.request
from datetime import datetime, timedelta, timezone

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

PG = "postgres://postgres@127.0.0.1:5432"

def psql(db, *args):
    """psql's unaligned, tuples-only output, one row a line."""
    out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-F", " ", "-v", "ON_ERROR_STOP=1", f"{PG}/{db}", *args],
                         check=True, capture_output=True, text=True).stdout
    return [l for l in out.split("\n") if l]

def start(binary, data, key, pg_db=None):
    port = free_port()
    env = dict(os.environ, SLUICE_BOOTSTRAP_KEY=key, RUST_LOG=os.environ.get("SLOG", "warn"))
    state = ["--state-url", f"{PG}/{pg_db}"] if pg_db else []
    p = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data, *state], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(data, "..", "server.err"), "a"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1); return p, url
        except Exception:
            time.sleep(0.1)
    raise SystemExit("server did not start")

def stat(path):
    """(command name, CPU seconds used) of a process or thread, from /proc."""
    st = open(path).read()
    f = st[st.rindex(")") + 2:].split()
    return st[st.index("(") + 1:st.rindex(")")], (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def cpu(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, s = stat(f"/proc/{pid}/task/{t}/stat")
        except OSError:
            continue
        kind = "sqlite" if comm.startswith("sqlx-sqlite") else comm
        out[kind] = out.get(kind, 0) + s
    # PostgreSQL's server processes (all of the machine's: nothing else uses it during a run).
    for q in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm, s = stat(f"/proc/{q}/stat")
        except OSError:
            continue
        if comm == "postgres":
            out["postgres"] = out.get("postgres", 0) + s
    return out

def call(url, key, method, path, body=None):
    req = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")

def wait_job(url, key, jid):
    while True:
        j = call(url, key, "GET", f"/v1/jobs/{jid}")
        if j["status"] == "succeeded": return j
        if j["status"] in ("failed", "cancelled"): raise SystemExit(f"job {j}")
        time.sleep(0.05)

def config(good, normal):
    """The bench's configuration, read from its source (one definition)."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    src = open(os.path.join(here, "..", "..", "crates", "sluice", "src", "bench", "health.rs")).read()
    m = re.search(r"pub fn config\(\) -> Value \{\n    json!\((.*?)\)\n\}", src, re.S)
    c = json.loads(m.group(1))
    c["bands"] = {"good": good, "normal": normal}
    return c

TYPES = ["report.created", "page", "page", "page", "page", "page", "login", "login", "api.call", "api.call"]

def setup(binary, d, n, e, store="sqlite"):
    shutil.rmtree(d, ignore_errors=True); os.makedirs(d + "/data")
    root = "sk_root_harness"
    pg_db = None
    if store == "pg":
        pg_db = "health_harness"
        psql("postgres", "-c", f"DROP DATABASE IF EXISTS {pg_db}", "-c", f"CREATE DATABASE {pg_db}")
        open(d + "/pg", "w").write(pg_db)
    p, url = start(binary, d + "/data", root, pg_db)
    call(url, root, "POST", "/v1/workspaces", {"name": "bench", "time_zone": "Asia/Tokyo"})
    admin = call(url, root, "POST", "/v1/keys", {"name": "bench", "scope": "admin", "workspace": "bench"})["secret"]
    open(d + "/key", "w").write(admin)
    put = call(url, admin, "PUT", "/v1/health/config", config(75, 45))
    wait_job(url, admin, put["recompute_job"]["id"])
    p.send_signal(signal.SIGTERM); p.wait(60)
    db = None if pg_db else sqlite3.connect(d + "/data/state.db")
    t0 = datetime.now(timezone.utc)
    today = t0.astimezone(timezone(timedelta(hours=9))).date()
    us = lambda t: int(t.timestamp() * 1_000_000)
    rng = random.Random(42)
    span = 90 * 86_400_000_000
    end = us(t0) - 3_600_000_000
    rows = []
    g_at = us(t0 - timedelta(days=91))
    attrs = []
    for i in range(n):
        renewal = today + timedelta(days=(i * 7) % 400 - 30)
        patch = json.dumps({"renewal_date": renewal.isoformat(), "mrr": (i % 50 + 1) * 1000, "plan": "trial" if i % 10 == 0 else "pro"})
        rows.append(("bench", f"c{i}", "group", g_at, f"g{i}", f"u{i}_0", patch))
        attrs.append(("bench", f"c{i}", g_at, f"g{i}", "group", patch, None))
    for i in range(e):
        c = rng.randrange(n)
        frac = rng.random()
        at = end - int((1.0 - math.sqrt(frac)) * span)
        rows.append(("bench", f"c{c}", TYPES[rng.randrange(10)], at, f"e{i}", f"u{c}_{rng.randrange(8)}", None))
    if pg_db:
        # PostgreSQL's heap keeps rows in the order they came (the bench's
        # ingest: by time), not by key as SQLite's clustered table does.
        import csv
        rows.sort(key=lambda r: r[3])
        for table, cols, data in (("health_events", "workspace, customer_id, event_type, ts, event_id, user_id, properties", rows),
                                  ("customer_attribute_changes", "workspace, customer_id, at, ref, source, patch, set_by", attrs)):
            f = f"{d}/{table}.csv"
            with open(f, "w", newline="") as out:
                csv.writer(out).writerows(data)
            psql(pg_db, "-c", f"\\copy {table} ({cols}) FROM '{f}' CSV")
            os.remove(f)
        print(f"setup: {n} customers, {e} events at {t0.isoformat()} (PostgreSQL database {pg_db})")
        return
    rows.sort(key=lambda r: (r[1], r[2], r[3], r[4]))
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.executemany("INSERT INTO health_events (workspace, customer_id, event_type, ts, event_id, user_id, properties) VALUES (?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO customer_attribute_changes (workspace, customer_id, at, ref, source, patch, set_by) VALUES (?,?,?,?,?,?,?)", attrs)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"setup: {n} customers, {e} events at {t0.isoformat()}")

def lists(url, admin, label):
    """Times GET /v1/customers pages (50 rows) by health, as the dashboard
    asks for them: the median of 5 first pages of each list, and 20 pages
    followed by their cursors."""
    def page(q):
        t = time.monotonic(); r = call(url, admin, "GET", "/v1/customers?limit=50&" + q)
        return time.monotonic() - t, r
    for q in ("sort=priority", "sort=priority&band=bad", "sort=priority&band=good", "sort=priority&stage=renewal", "sort=score", "sort=-score"):
        ts = sorted(page(q)[0] for _ in range(5))
        print(f"{label}: list {q}: first page {ts[2] * 1000:.1f} ms (median of 5)", flush=True)
    ts, cursor = [], None
    for _ in range(20):
        t, r = page("sort=priority" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else ""))
        ts.append(t); cursor = r["next_cursor"]
    ts.sort()
    print(f"{label}: list sort=priority: pages 1-20 by cursor, median {ts[10] * 1000:.1f} ms, slowest {ts[-1] * 1000:.1f} ms", flush=True)

def run(binary, d, label, k):
    work = d + "/work-" + label
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(d + "/data", work)
    admin = open(d + "/key").read()
    pg_db = None
    if os.path.exists(d + "/pg"):
        # A copy of the loaded database per run, as the data directory is.
        src = open(d + "/pg").read()
        pg_db = f"{src}_{label}".replace("-", "_").lower()
        psql("postgres", "-c", f"DROP DATABASE IF EXISTS {pg_db}", "-c", f"CREATE DATABASE {pg_db} TEMPLATE {src}")
    p, url = start(binary, work, "sk_root_harness", pg_db)
    times = []
    try:
        for i in range(k + 1):
            perf = None
            if os.environ.get("STRACE") and i == k:
                perf = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,pwrite64,pread64,futex", "-p", str(p.pid), "-o", f"{d}/strace-{label}.txt"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            elif os.environ.get("PERF") and i == k:
                perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(p.pid), "-o", f"{d}/perf-{label}.data"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            c0 = cpu(p.pid)
            t = time.monotonic()
            put = call(url, admin, "PUT", "/v1/health/config", config(70 + i, 40))
            j = wait_job(url, admin, put["recompute_job"]["id"])
            s = time.monotonic() - t
            times.append(s)
            c1 = cpu(p.pid)
            print("   cpu s:", {k: round(c1[k] - c0.get(k, 0), 2) for k in c1 if c1[k] - c0.get(k, 0) > 0.05}, flush=True)
            if perf:
                perf.send_signal(signal.SIGINT); perf.wait(60)
            print(f"{label}: recompute {i} ({'warm-up: inserts' if i == 0 else 'upserts'}) of {j['result']['customers_total']} customers: {s:.2f} s", flush=True)
        lists(url, admin, label)
    finally:
        p.send_signal(signal.SIGTERM); p.wait(60)
    # Customers per stage and band, straight from the state store (the SQL
    # `customers` table is the identified customers, which this data has none of).
    q = "SELECT stage, band, count(*) FROM customer_health WHERE workspace = 'bench' GROUP BY stage, band ORDER BY stage, band"
    if pg_db:
        counts = psql(pg_db, "-c", q)
    else:
        counts = [" ".join(map(str, r)) for r in sqlite3.connect(work + "/state.db").execute(q)]
    print(label, "stage band customers:", "; ".join(counts))
    up = sorted(times[1:])
    print(f"{label}: upsert recomputes {', '.join(f'{x:.2f}' for x in times[1:])}; median {up[len(up)//2]:.2f} s")

if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] if len(sys.argv) > 6 else "sqlite")
    else:
        run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 3)
