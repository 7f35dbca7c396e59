-- Foundation: workspaces, API keys, the event id index (dedup + lookup by id)
-- and how far the event log has been indexed. Times are Unix microseconds.

CREATE TABLE workspaces (
    name        TEXT PRIMARY KEY NOT NULL,
    time_zone   TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    workspace   TEXT NOT NULL REFERENCES workspaces(name),
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL CHECK (scope IN ('root', 'admin', 'read', 'ingest')),
    key_hash    BLOB NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT,
    revoked_at  INTEGER
);
CREATE INDEX api_keys_workspace ON api_keys (workspace, id);

-- One row per accepted event id per workspace: the dedup index, and where the
-- event sits in the log. Derived from the log: rebuilt from log_progress on start.
CREATE TABLE event_index (
    workspace     TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    log_partition INTEGER NOT NULL,
    log_offset    INTEGER NOT NULL,
    received_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace, event_id)
) WITHOUT ROWID;
CREATE INDEX event_index_received_at ON event_index (received_at);

-- Next log offset not yet reflected in event_index, per partition.
CREATE TABLE log_progress (
    log_partition INTEGER PRIMARY KEY NOT NULL,
    next_offset   INTEGER NOT NULL
);
