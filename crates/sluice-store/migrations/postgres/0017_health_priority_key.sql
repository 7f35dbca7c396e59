-- The list of customers by priority (GET /v1/customers?sort=priority, the
-- dashboard's default) reads a page from this index: its order is the
-- list's, `-COALESCE(priority, -1.0)` then the id (highest priority first,
-- customers without one last), so a page is one seek and a short scan.
-- The index it replaces held the bare priority, which that order could not
-- use: every page sorted all of the workspace's rows. Like the old one, it
-- changes only when a priority does (the evaluation writes the priority in
-- its own statement on SQLite).
DROP INDEX customer_health_by_priority;
CREATE INDEX customer_health_by_priority_key ON customer_health (workspace, (-COALESCE(priority, -1.0)), customer_id);
