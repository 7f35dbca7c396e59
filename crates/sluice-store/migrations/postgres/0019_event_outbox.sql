-- The outbox (0018) carries customer health's transition events too
-- (docs/health.md, "Transitions out"). A health row holds the whole event
-- (`event`, JSON), written in the transaction that saves the evaluation
-- which decided it; `subject` is then the event's id. Billing's rows keep
-- `event` NULL: their event is made from the invoice (`subject`) when sent.
ALTER TABLE billing_outbox RENAME TO event_outbox;
ALTER TABLE event_outbox RENAME COLUMN invoice_id TO subject;
ALTER TABLE event_outbox ADD COLUMN event TEXT;
