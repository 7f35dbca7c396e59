"""DuckDB side of `sluice bench lake`: runs the same queries on the same
Parquet files (Hive partitioning) and prints {"name": seconds, ...} as JSON.

usage: lake_duckdb.py LAKE_ROOT WORKSPACE CUSTOMERS_CSV QUERIES_JSON RUNS
"""
import json
import sys
import time

import duckdb

root, workspace, customers, queries, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
con = duckdb.connect()
con.execute(f"""CREATE VIEW events AS SELECT * FROM read_parquet('{root}/workspace={workspace}/*/*/*/*/*/*.parquet',
    hive_partitioning = true, union_by_name = true,
    hive_types = {{'content_type': VARCHAR, 'year': VARCHAR, 'month': VARCHAR, 'day': VARCHAR, 'hour': VARCHAR}})""")
con.execute(f"CREATE TABLE customers AS SELECT * FROM read_csv('{customers}', header = true)")
out = {}
for name, sql in json.load(open(queries)).items():
    best = None
    for _ in range(runs):
        t = time.perf_counter()
        rows = con.execute(sql).fetchall()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    out[name] = {"seconds": best, "rows": len(rows)}
print(json.dumps(out))
