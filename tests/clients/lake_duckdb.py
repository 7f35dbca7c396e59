"""Reads the Sluice lake with DuckDB (Hive partitioning) and prints, as JSON,
the numbers the end-to-end test compares with `POST /v1/sql`.

usage: lake_duckdb.py LAKE_ROOT WORKSPACE
"""
import json
import sys

import duckdb

root, workspace = sys.argv[1], sys.argv[2]
glob = f"{root}/workspace={workspace}/*/*/*/*/*/*.parquet"
con = duckdb.connect()
src = f"read_parquet('{glob}', hive_partitioning = true, union_by_name = true, hive_types = {{'content_type': VARCHAR, 'year': VARCHAR, 'month': VARCHAR, 'day': VARCHAR, 'hour': VARCHAR}})"
by_type = dict(con.execute(f"SELECT content_type, count(*) FROM {src} GROUP BY 1").fetchall())
by_hour = {f"{r[0]}-{r[1]}-{r[2]}T{r[3]}": r[4] for r in con.execute(
    f"SELECT year, month, day, hour, count(*) FROM {src} GROUP BY ALL").fetchall()}
total, distinct_ids, amount = con.execute(
    f"SELECT count(*), count(DISTINCT id), sum(CAST(json_extract(properties, '$.amount') AS DOUBLE)) FROM {src}").fetchone()
# Partition directories must match each row's own timestamp (UTC hour).
misplaced = con.execute(
    f"SELECT count(*) FROM {src} WHERE strftime(timezone('UTC', timestamp), '%Y-%m-%dT%H') <> year || '-' || month || '-' || day || 'T' || hour"
).fetchone()[0]
print(json.dumps({"by_type": by_type, "by_hour": by_hour, "total": total, "distinct_ids": distinct_ids,
                  "amount": amount, "misplaced": misplaced}))
