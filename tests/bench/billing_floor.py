#!/usr/bin/env python3
"""A floor under `sluice bench billing` on SQLite: the time it takes only to
write N finalized invoices into a table shaped like Sluice's `invoices`
(crates/sluice-store/migrations/sqlite/0010_billing.sql, 0011: the same
primary key, the once-per-period and number unique indexes, the run and
subscription indexes), in commits of 500 rows as a billing run makes them,
with the pragmas Sluice's state store uses (WAL, synchronous FULL).

Nothing is read, computed, numbered or sent to the log here: a billing run
does all of that besides (issue 8 asks for each invoice's lines with their
tiers, the SQL that reproduces each usage line's quantity, the log position
and plan version, a gapless number taken at finalization, and an
`invoice.finalized` event in the log). The figure is set beside the
reference statement of `sluice bench billing` (a PostgreSQL statement that
only sums the totals) in docs/BENCHMARKS.md, "Billing".

    python3 tests/bench/billing_floor.py            # 100,000 invoices, documents as Sluice writes them (~1.9 KB)
    python3 tests/bench/billing_floor.py 100000 small   # the same with an 80-byte document
"""

import json
import os
import sqlite3
import sys
import tempfile
import time

SCHEMA = """
CREATE TABLE invoices (
    workspace TEXT NOT NULL, id TEXT NOT NULL, subscription_id TEXT NOT NULL,
    customer_id TEXT NOT NULL, status TEXT NOT NULL, number TEXT,
    period_start INTEGER NOT NULL, period_end INTEGER NOT NULL, run_id TEXT,
    doc TEXT NOT NULL, created_at INTEGER NOT NULL, finalized_at INTEGER,
    voided_at INTEGER, paid_at INTEGER, PRIMARY KEY (workspace, id));
CREATE UNIQUE INDEX invoices_once ON invoices (workspace, subscription_id, period_start) WHERE status <> 'void';
CREATE UNIQUE INDEX invoices_number ON invoices (workspace, number);
CREATE INDEX invoices_by_run ON invoices (run_id);
CREATE INDEX invoices_by_subscription ON invoices (workspace, subscription_id, period_start);
"""


def document(small: bool) -> str:
    if small:
        return json.dumps({"q": ["123", "456", "789"], "a": ["615", "1200", "3000", "10000"], "t": "1483"})
    sql = ("SELECT sum(value) FROM usage WHERE meter = 'storage_gb' AND customer_id = 'c1' "
           "AND period_start >= '2026-11-01T00:00:00+09:00' AND period_start < '2026-12-01T00:00:00+09:00'")
    lines = [{"kind": "usage", "description": "Storage (GB), 2026-11-01 – 2026-11-30", "meter": f"m{i}",
              "quantity": "123", "unit_price": "5", "amount": "615", "tax_rate": "0.10",
              "tiers": [{"up_to": "100", "units": "100", "amount": "0"}, {"up_to": "1000", "units": "23", "amount": "115"}],
              "sql": sql} for i in range(4)]
    return json.dumps({"lines": lines, "taxes": [{"rate": "0.10", "taxable_amount": "1000", "tax": "100"}]})


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    small = len(sys.argv) > 2 and sys.argv[2] == "small"
    doc = document(small)
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "floor.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        start = time.perf_counter()
        for b in range(0, n, 500):
            rows = [("bench", f"inv_{i:08d}", f"sub_{i}", f"c{i}", "finalized", f"INV-202611-{i + 1:06d}",
                     1, 2, "run", doc, 3, 3, None, None) for i in range(b, min(n, b + 500))]
            db.execute("BEGIN")
            db.executemany("INSERT INTO invoices VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.execute("COMMIT")
        took = time.perf_counter() - start
    print(f"{n} invoices ({len(doc)}-byte documents) written in {n // 500} commits: {took:.2f} s ({n / took:,.0f}/s), SQLite {sqlite3.sqlite_version}")


if __name__ == "__main__":
    main()
