"""Independent computation of per-customer monthly usage totals from a usage
CSV, in a workspace time zone, with exact decimals (Python's decimal and
zoneinfo, no Sluice code): prints {"customer|YYYY-MM": "total", ...} as JSON.

A date-only timestamp (YYYY-MM-DD) is the start of that day in the time
zone; RFC 3339 timestamps are converted to it.

usage: usage_totals.py FILE TIME_ZONE
"""
import csv
import json
import sys
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

path, tz = sys.argv[1], ZoneInfo(sys.argv[2])
totals = defaultdict(Decimal)
with open(path, newline="", encoding="utf-8-sig") as f:
    for row in csv.DictReader(f):
        ts = row["timestamp"].strip()
        if len(ts) == 10:
            local = datetime.fromisoformat(ts).replace(tzinfo=tz)
        else:
            local = datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(tz)
        totals[f"{row['customer_id']}|{local:%Y-%m}"] += Decimal(row["quantity"])
print(json.dumps({k: format(v.normalize(), "f") for k, v in totals.items()}))
