"""DuckDB side of `sluice bench health`: computes the measures and the stage
of every customer from the lake's Parquet files, as the benchmark's
configuration defines them (windows in local calendar days of Asia/Tokyo),
and prints {"seconds": s, "stages": {stage: customers}} as JSON.

usage: health_duckdb.py LAKE_ROOT WORKSPACE AS_OF_RFC3339
"""
import datetime
import json
import sys
import time
from zoneinfo import ZoneInfo

import duckdb

root, workspace, as_of = sys.argv[1], sys.argv[2], sys.argv[3]
tz = ZoneInfo("Asia/Tokyo")
t = datetime.datetime.fromisoformat(as_of.replace("Z", "+00:00"))
today = t.astimezone(tz).date()


def start(days):
    """00:00 local of the date days-1 before today: the start of "the last N days"."""
    d = today - datetime.timedelta(days=days - 1)
    return datetime.datetime.combine(d, datetime.time(0), tzinfo=tz).isoformat()


con = duckdb.connect()
con.execute("SET TimeZone = 'Asia/Tokyo'")
con.execute(f"""CREATE VIEW events AS SELECT * FROM read_parquet('{root}/workspace={workspace}/*/*/*/*/*/*.parquet',
    hive_partitioning = true, union_by_name = true,
    hive_types = {{'content_type': VARCHAR, 'year': VARCHAR, 'month': VARCHAR, 'day': VARCHAR, 'hour': VARCHAR}})""")
sql = f"""
WITH ev AS (SELECT customer_id, type, user_id, "timestamp" AS ts, properties FROM events
            WHERE customer_id IS NOT NULL AND "timestamp" <= TIMESTAMPTZ '{t.isoformat()}'),
agg AS (SELECT customer_id,
    count(*) FILTER (WHERE type = 'report.created' AND ts >= TIMESTAMPTZ '{start(30)}') AS reports_30d,
    count(DISTINCT user_id) FILTER (WHERE type = 'page' AND ts >= TIMESTAMPTZ '{start(7)}') AS active_users,
    max(ts) FILTER (WHERE type = 'login') AS last_login,
    count(*) FILTER (WHERE type = 'api.call' AND ts >= TIMESTAMPTZ '{start(14)}') AS api_cur,
    count(*) FILTER (WHERE type = 'api.call' AND ts >= TIMESTAMPTZ '{start(28)}' AND ts < TIMESTAMPTZ '{start(14)}') AS api_prev,
    arg_max(properties, ts) FILTER (WHERE type = 'group') AS traits
  FROM ev GROUP BY customer_id),
m AS (SELECT customer_id, reports_30d, active_users,
    date_diff('day', CAST(last_login AS DATE), DATE '{today.isoformat()}') AS idle_days,
    CASE WHEN api_prev > 0 THEN (api_cur - api_prev) * 100.0 / api_prev END AS usage_trend,
    date_diff('day', DATE '{today.isoformat()}', CAST(json_extract_string(traits, '$.renewal_date') AS DATE)) AS to_renewal,
    json_extract_string(traits, '$.plan') AS plan,
    CAST(json_extract_string(traits, '$.mrr') AS DOUBLE) AS mrr
  FROM agg)
SELECT CASE WHEN to_renewal <= 60 AND to_renewal >= 0 THEN 'renewal'
            WHEN plan = 'trial' THEN 'trial'
            WHEN reports_30d < 3 THEN 'onboarding'
            ELSE 'adoption' END AS stage, count(*) AS n
FROM m GROUP BY 1
"""
began = time.perf_counter()
rows = con.execute(sql).fetchall()
seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "stages": {r[0]: r[1] for r in rows}}))
