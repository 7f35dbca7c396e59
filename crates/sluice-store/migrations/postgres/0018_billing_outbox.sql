-- Billing's events on their way into the log (docs/billing.md, "Events"):
-- a row is written in the transaction that finalizes or voids an invoice
-- and deleted once its event is in the log, so a crash between the commit
-- and the send loses no event: the rows left over are sent at the next
-- start (and by every auto-billing pass). The event id is derived from the
-- invoice (`invoice.finalized:<id>`), so an event sent twice (a crash after
-- the send, before the delete) is dropped by the ingest's id index.
CREATE TABLE billing_outbox (
    workspace   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    invoice_id  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (workspace, kind, invoice_id)
);
