-- Customer health (sluice-health, docs/health.md). Times are Unix
-- microseconds. health_events, customer_attribute_changes (source 'group')
-- and health_dirty are the health consumer's read model, committed with its
-- checkpoint; the rest is written by the API and the evaluator.

-- Every event of a customer, as the measures read it.
CREATE TABLE health_events (
    workspace    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    ts           BIGINT NOT NULL,
    event_id     TEXT NOT NULL,
    user_id      TEXT,
    properties   TEXT,
    PRIMARY KEY (workspace, customer_id, event_type, ts, event_id)
) WITHOUT ROWID;
-- Clustered by its key and no second index: every event is written once,
-- and a customer's reads are one range of the key (a third of the writes
-- of a rowid table with two indexes; sluice bench health).

-- Attribute changes with their time: PATCH /v1/customers/{id} (source
-- 'api', at the request's time) and the traits of `group` calls (source
-- 'group', at the event's time). The attributes at T are these patches
-- applied in (at, ref) order up to T.
CREATE TABLE customer_attribute_changes (
    workspace    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    at           BIGINT NOT NULL,
    ref          TEXT NOT NULL,
    source       TEXT NOT NULL,
    patch        TEXT NOT NULL,
    set_by       TEXT,
    PRIMARY KEY (workspace, customer_id, at, ref)
);

-- Configuration versions (1, 2, …); the highest is current.
CREATE TABLE health_configs (
    workspace   TEXT NOT NULL,
    version     BIGINT NOT NULL,
    config      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT,
    PRIMARY KEY (workspace, version)
);

-- Manual stage overrides, kept as a history: the row in force at T is the
-- latest with set_at <= T; stage NULL means lifted.
CREATE TABLE stage_overrides (
    workspace    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    set_at       BIGINT NOT NULL,
    stage        TEXT,
    reason       TEXT,
    until_at     BIGINT,
    set_by       TEXT,
    PRIMARY KEY (workspace, customer_id, set_at)
);

-- The live evaluation of each customer. doc is the full explanation.
CREATE TABLE customer_health (
    workspace       TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    config_version  BIGINT NOT NULL,
    stage           TEXT,
    stage_since     BIGINT,
    score           DOUBLE PRECISION,
    band            TEXT,
    priority        DOUBLE PRECISION,
    doc             TEXT NOT NULL,
    evaluated_at    BIGINT NOT NULL,
    next_eval_at    BIGINT NOT NULL,
    emitted         TEXT NOT NULL,
    PRIMARY KEY (workspace, customer_id)
);
CREATE INDEX customer_health_due ON customer_health (next_eval_at);
CREATE INDEX customer_health_by_priority ON customer_health (workspace, priority);

-- Changes of stage, band, or score by more than the configured step.
CREATE TABLE health_history (
    id              TEXT PRIMARY KEY NOT NULL,
    workspace       TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    at              BIGINT NOT NULL,
    config_version  BIGINT NOT NULL,
    stage           TEXT,
    stage_since     BIGINT,
    band            TEXT,
    score           DOUBLE PRECISION,
    previous        TEXT NOT NULL,
    cause           TEXT NOT NULL
);
CREATE INDEX health_history_by_customer ON health_history (workspace, customer_id, at);

-- Customers whose events were committed but not evaluated yet.
CREATE TABLE health_dirty (
    workspace    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    marked       BIGINT NOT NULL,
    PRIMARY KEY (workspace, customer_id)
);
