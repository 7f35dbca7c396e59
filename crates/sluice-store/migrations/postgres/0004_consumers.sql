-- Consumers: a checkpoint per consumer and partition (the next offset to
-- process), dead letters, the event_counts read model, webhooks and their
-- deliveries. Times are Unix microseconds.

CREATE TABLE consumer_checkpoints (
    consumer       TEXT NOT NULL,
    log_partition  INTEGER NOT NULL,
    next_offset    BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (consumer, log_partition)
);

-- status: dead (waiting for an operator), replaying (claimed by a replay),
-- replayed (processed successfully by a replay), discarded.
CREATE TABLE dead_letters (
    id               TEXT PRIMARY KEY NOT NULL,
    consumer         TEXT NOT NULL,
    workspace        TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    log_partition    INTEGER NOT NULL,
    log_offset       BIGINT NOT NULL,
    error            TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    first_failed_at  BIGINT NOT NULL,
    last_failed_at   BIGINT NOT NULL,
    status           TEXT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX dead_letters_by_workspace ON dead_letters (workspace, consumer, status, id);
CREATE INDEX dead_letters_by_status ON dead_letters (consumer, status);

-- Read model of the built-in event_counts consumer: events per workspace,
-- type, customer ('' = none) and UTC day.
CREATE TABLE event_counts (
    workspace    TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    day          TEXT NOT NULL,
    count        BIGINT NOT NULL,
    PRIMARY KEY (workspace, event_type, customer_id, day)
);

CREATE TABLE webhooks (
    id           TEXT PRIMARY KEY NOT NULL,
    workspace    TEXT NOT NULL,
    url          TEXT NOT NULL,
    event_types  TEXT NOT NULL,
    secret       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    created_by   TEXT,
    deleted_at   BIGINT
);
CREATE INDEX webhooks_by_workspace ON webhooks (workspace, id);

-- One row per (webhook, event): its id is the stable webhook-id header.
CREATE TABLE webhook_deliveries (
    id                TEXT PRIMARY KEY NOT NULL,
    webhook_id        TEXT NOT NULL,
    event_id          TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INTEGER NOT NULL,
    last_status_code  INTEGER,
    last_error        TEXT,
    next_retry_at     BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
