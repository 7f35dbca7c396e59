-- The health evaluator takes marked customers oldest first. `marked` moves
-- forward with every new event (it says which mark an evaluation cleared),
-- so ordering by it sent a customer with steady traffic to the back of the
-- queue again and again: under load it was never evaluated. `since` is when
-- the customer was first marked after its last evaluation; it does not
-- move until the mark is cleared, so every marked customer waits at most
-- one pass of the queue.
ALTER TABLE health_dirty ADD COLUMN since BIGINT NOT NULL DEFAULT 0;
UPDATE health_dirty SET since = marked;
CREATE INDEX health_dirty_by_since ON health_dirty (since);
