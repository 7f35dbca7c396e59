-- The event lake's manifest: every committed Parquet file. A file is part of
-- the lake exactly when its row is here; the lake writer inserts rows in the
-- same transaction that moves its checkpoint, and compaction swaps rows in
-- one transaction. Files on disk without a row are leftovers of a crash and
-- are removed on start. Paths are relative to the lake root. Times: Unix
-- microseconds.
CREATE TABLE lake_files (
    path          TEXT PRIMARY KEY,
    workspace     TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    hour_start    INTEGER NOT NULL,
    row_count     INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    min_time      INTEGER NOT NULL,
    max_time      INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX lake_files_partition ON lake_files (workspace, content_type, hour_start);

-- Declared property types per event type (typed lake columns p_<name>).
CREATE TABLE event_schemas (
    workspace    TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    properties   TEXT NOT NULL,
    enforce      BOOLEAN NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace, event_type)
);

-- Saved SQL queries, optionally scheduled (cron) and exported to the lake.
CREATE TABLE saved_queries (
    workspace     TEXT NOT NULL,
    name          TEXT NOT NULL,
    sql           TEXT NOT NULL,
    schedule      TEXT,
    export        TEXT,
    next_run_at   INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace, name)
);
