-- The dashboard's overview samples, every few seconds, how many jobs wait or
-- run and how many dead letters wait in every workspace, and counts each
-- workspace's failures of the last hour: these indexes keep those reads to
-- the rows they count (without them each sample scanned every dead letter).
CREATE INDEX dead_letters_waiting ON dead_letters (status, workspace);
CREATE INDEX dead_letters_by_time ON dead_letters (workspace, first_failed_at);
CREATE INDEX jobs_ended ON jobs (workspace, state, finished_at);
-- GET /v1/live asks every second, per open dashboard, when a workspace's
-- jobs and dead letters last changed: MAX(updated_at) by index.
CREATE INDEX jobs_changed ON jobs (workspace, updated_at);
CREATE INDEX dead_letters_changed ON dead_letters (workspace, updated_at);
