-- The dedup index moved into the event log's own id index (files beside the
-- log, see crates/sluice-log/src/index.rs): a B-tree row per event id cost
-- seconds per million ids. The index is derived from the log and is rebuilt
-- from it on the first start after this migration. log_progress stays: it
-- now tracks how far the record effects (users, customers) were applied.
DROP TABLE IF EXISTS event_index;
