-- Voiding an invoice that is not a subscription's latest leaves a period
-- to bill again (docs/billing.md, "Voiding"). The periods are in the
-- subscription's document (`reissue`); this column is the earliest one's
-- start (NULL: none), so that a run of due subscriptions finds them
-- without reading every document.
ALTER TABLE subscriptions ADD COLUMN reissue_from BIGINT;
