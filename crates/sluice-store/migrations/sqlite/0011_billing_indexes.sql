-- Invoices by subscription for every read that is not about the
-- one-invoice-per-period guard (a subscription's history, a billing
-- batch's invoices): the partial unique index of 0010 (WHERE status <>
-- 'void') cannot serve a query that does not say `status <> 'void'`, and
-- without this one each billing batch scanned every invoice of the
-- workspace (sluice bench billing: 65 s for 100,000 subscriptions).
CREATE INDEX invoices_by_subscription ON invoices (workspace, subscription_id, period_start);
