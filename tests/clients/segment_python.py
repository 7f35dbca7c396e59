"""Sends identify, group, track and page calls with Segment's official Python
client (segment-analytics-python), pointed at a Sluice server, then sends one
batch twice through the client's own request function (a retry).

Usage: segment_python.py URL WRITE_KEY
Exits non-zero if the client reports any error.
"""
import sys
from datetime import datetime, timedelta, timezone

from segment.analytics import Client
from segment.analytics.request import post

url, key = sys.argv[1], sys.argv[2]
errors = []
client = Client(key, host=url, sync_mode=True, gzip=True, max_retries=0, on_error=lambda e, batch: errors.append(e))

client.identify("py-user", {"email": "py@example.com", "name": "Py"}, message_id="py-identify-1")
client.group("py-user", "py-acme", {"name": "Acme (Python)", "plan": "pro"}, message_id="py-group-1")
# A track call with an explicit timestamp 10 minutes in the past (clock skew is corrected
# against sentAt, so the stored time is receivedAt - 10 min).
past = datetime.now(tz=timezone.utc) - timedelta(minutes=10)
client.track("py-user", "Order Completed", {"total": 12.5, "currency": "EUR"}, timestamp=past, message_id="py-track-1")
client.page("py-user", "Docs", "Getting Started", {"path": "/docs"}, message_id="py-page-1")
client.flush()

# The same batch twice, as a client retry after a lost response would send it.
batch = [{"type": "track", "userId": "py-user", "event": "Retried Event", "messageId": "py-retry-1",
          "timestamp": datetime.now(tz=timezone.utc).isoformat(), "properties": {}}]
for _ in range(2):
    res = post(key, host=url, batch=batch)
    assert res.status_code == 200, res.text

if errors:
    print("client errors:", errors, file=sys.stderr)
    sys.exit(1)
print("ok")
