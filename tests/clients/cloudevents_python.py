"""Sends one structured-mode CloudEvent and one batch of CloudEvents, written
by the CloudEvents Python SDK (`cloudevents` 2.x, its core API), to a Sluice
server.

Usage: cloudevents_python.py URL KEY
"""
import sys
from datetime import datetime, timezone

import requests
from cloudevents.core.bindings.http import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

url, key = sys.argv[1], sys.argv[2]
auth = {"Authorization": f"Bearer {key}"}
fmt = JSONFormat()

one = CloudEvent(
    attributes={"id": "ce-sdk-1", "type": "com.example.sdk.created", "source": "/sdk/test",
                "subject": "ce-customer", "time": datetime(2024, 3, 4, 5, 6, 7, tzinfo=timezone.utc),
                "datacontenttype": "application/json"},
    data={"n": 1},
)
message = to_structured(one, fmt)
r = requests.post(f"{url}/v1/events", data=message.body, headers={**message.headers, **auth})
assert r.status_code == 200, r.text
assert r.json() == {"accepted": 1, "duplicates": 0}, r.text

# Batched content mode: a JSON array of structured events.
batch = [CloudEvent(attributes={"id": f"ce-sdk-b{i}", "type": "com.example.sdk.batched", "source": "/sdk/test",
                                "datacontenttype": "application/json"}, data={"i": i})
         for i in range(3)]
body = b"[" + b",".join(fmt.write(e) for e in batch) + b"]"
r = requests.post(f"{url}/v1/events", data=body, headers={"Content-Type": "application/cloudevents-batch+json", **auth})
assert r.status_code == 200, r.text
assert r.json() == {"accepted": 3, "duplicates": 0}, r.text
print("ok")
