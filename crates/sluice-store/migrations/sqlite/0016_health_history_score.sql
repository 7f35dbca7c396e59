-- The score of each customer's latest history row, kept on its live row.
-- An evaluation compares with the latest history (a stage, band or version
-- change, or a score moved by more than the step, writes a new one); it
-- read that row with MAX(id) over every history row of the customer, a
-- read that grew with each change. The latest row's stage, band and version
-- are the live row's already: both are written only together.
ALTER TABLE customer_health ADD COLUMN history_score DOUBLE PRECISION;
UPDATE customer_health SET history_score = (
    SELECT h.score FROM health_history h
    WHERE h.workspace = customer_health.workspace AND h.customer_id = customer_health.customer_id
    ORDER BY h.id DESC LIMIT 1
);
