-- Audit log: who (key id) did what, when, on what. One row per operator or
-- admin action; written in the same transaction as the action itself.
CREATE TABLE audit_log (
    id            TEXT PRIMARY KEY NOT NULL,
    workspace     TEXT NOT NULL,
    at            INTEGER NOT NULL,
    actor_key_id  TEXT,
    action        TEXT NOT NULL,
    target_type   TEXT NOT NULL,
    target_id     TEXT NOT NULL,
    details       TEXT NOT NULL
);
CREATE INDEX audit_log_by_workspace ON audit_log (workspace, id);
