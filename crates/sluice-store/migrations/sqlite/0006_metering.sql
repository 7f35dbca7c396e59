-- Meters and their usage read model (maintained by the "meters" consumer).
-- Usage is kept per 15-minute bucket (UTC), fine enough for every time
-- zone's day and month boundaries (all UTC offsets are multiples of 15
-- minutes). Decimal values are exact decimal strings. Times: Unix microseconds.
CREATE TABLE meters (
    workspace       TEXT NOT NULL,
    meter_key       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    aggregation     TEXT NOT NULL,
    value_property  TEXT,
    group_by        TEXT NOT NULL,
    filter          TEXT NOT NULL,
    start_offsets   TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    created_by      TEXT,
    PRIMARY KEY (workspace, meter_key)
);

CREATE TABLE usage_buckets (
    workspace        TEXT NOT NULL,
    meter_key        TEXT NOT NULL,
    customer_id      TEXT NOT NULL,
    subscription_id  TEXT NOT NULL,
    group_key        TEXT NOT NULL,
    bucket_start     INTEGER NOT NULL,
    count            INTEGER NOT NULL,
    sum              TEXT NOT NULL,
    min              TEXT,
    max              TEXT,
    latest_at        INTEGER,
    latest_value     TEXT,
    PRIMARY KEY (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start)
);

-- Distinct values for unique_count meters.
CREATE TABLE usage_unique (
    workspace        TEXT NOT NULL,
    meter_key        TEXT NOT NULL,
    customer_id      TEXT NOT NULL,
    subscription_id  TEXT NOT NULL,
    group_key        TEXT NOT NULL,
    bucket_start     INTEGER NOT NULL,
    value            TEXT NOT NULL,
    PRIMARY KEY (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start, value)
);
