-- Billing (sluice-billing, docs/billing.md): per-workspace settings, plan
-- versions, subscriptions and invoices. Plan specs, subscriptions and
-- invoices are JSON documents (their shape is sluice-billing's); the columns
-- beside them are what queries filter, order and constrain on. Times are
-- Unix microseconds.
CREATE TABLE billing_settings (
    workspace   TEXT PRIMARY KEY NOT NULL,
    settings    TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Editing a plan adds a version; subscriptions name the version they bill on.
CREATE TABLE plans (
    workspace   TEXT NOT NULL,
    code        TEXT NOT NULL,
    version     BIGINT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT,
    PRIMARY KEY (workspace, code, version)
);

-- billed_until: where the next invoice period starts. revision: bumped by
-- every write, so a billing commit or a plan change made from a stale read
-- is refused instead of overwriting the other.
CREATE TABLE subscriptions (
    workspace     TEXT NOT NULL,
    id            TEXT NOT NULL,
    customer_id   TEXT NOT NULL,
    plan_code     TEXT NOT NULL,
    billed_until  BIGINT NOT NULL,
    end_at        BIGINT,
    doc           TEXT NOT NULL,
    revision      BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (workspace, id)
);
CREATE INDEX subscriptions_by_customer ON subscriptions (workspace, customer_id, id);

-- At most one invoice that is not void per (subscription, period start):
-- retries, overlapping runs and restarts cannot bill a period twice.
-- Numbers are unique per workspace (NULL until finalized).
CREATE TABLE invoices (
    workspace        TEXT NOT NULL,
    id               TEXT NOT NULL,
    subscription_id  TEXT NOT NULL,
    customer_id      TEXT NOT NULL,
    status           TEXT NOT NULL,
    number           TEXT,
    period_start     BIGINT NOT NULL,
    period_end       BIGINT NOT NULL,
    run_id           TEXT,
    doc              TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    finalized_at     BIGINT,
    voided_at        BIGINT,
    paid_at          BIGINT,
    PRIMARY KEY (workspace, id)
);
CREATE UNIQUE INDEX invoices_once ON invoices (workspace, subscription_id, period_start) WHERE status <> 'void';
CREATE UNIQUE INDEX invoices_number ON invoices (workspace, number);
CREATE INDEX invoices_by_run ON invoices (run_id);

-- The last invoice number of each workspace, taken in the finalizing
-- transaction (gapless: a rolled-back finalization takes no number).
CREATE TABLE invoice_counters (
    workspace  TEXT PRIMARY KEY NOT NULL,
    last       BIGINT NOT NULL
);
