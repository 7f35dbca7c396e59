"""Verifies a webhook delivery made by Sluice with the official Standard Webhooks
Python library (the `standardwebhooks` package on PyPI).

Usage: verify_webhook.py SECRET DELIVERY_JSON_FILE

DELIVERY_JSON_FILE holds what the receiver got:
    {"headers": {"webhook-id": "...", "webhook-timestamp": "...", "webhook-signature": "..."},
     "body": "<raw body string>"}
Header names are matched case-insensitively; other headers are ignored.

Prints "ok" and exits 0 when the signature verifies. Otherwise prints the reason to
stderr and exits 1 (2 for usage errors). The library also refuses timestamps more than
5 minutes away from the current time, so verify fresh deliveries.
"""
import json
import sys

from standardwebhooks.webhooks import Webhook


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    secret, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        delivery = json.load(f)
    headers = {str(k): str(v) for k, v in delivery["headers"].items()}
    body = delivery["body"]
    try:
        # json_parse=False: verify the exact bytes, whatever the payload is.
        Webhook(secret).verify(body, headers, json_parse=False)
    except Exception as e:  # WebhookVerificationError, or a malformed header/secret
        print(f"verification failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
