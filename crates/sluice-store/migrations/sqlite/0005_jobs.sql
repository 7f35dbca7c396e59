-- Durable jobs: imports, billing runs, rebuilds, exports, … (see sluice-jobs).
-- state: queued, running, succeeded, failed, cancelled. A running job holds
-- a lease; when its process dies the lease expires and the job is queued
-- again. Times are Unix microseconds.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY NOT NULL,
    workspace         TEXT NOT NULL,
    kind              TEXT NOT NULL,
    state             TEXT NOT NULL,
    payload           TEXT NOT NULL,
    result            TEXT,
    error             TEXT,
    errors            TEXT NOT NULL,
    progress_done     INTEGER NOT NULL,
    progress_total    INTEGER,
    attempts          INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    run_after         INTEGER NOT NULL,
    lease_until       INTEGER,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    created_by        TEXT,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX jobs_queue ON jobs (state, kind, run_after, id);
CREATE INDEX jobs_by_workspace ON jobs (workspace, id);
