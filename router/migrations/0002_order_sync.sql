-- Status sync: when each active order is next due, what the upstream charged for it, what the
-- reseller got back. Money stays INTEGER minor units (router.v2.MINOR_PER_UNIT).

ALTER TABLE orders ADD COLUMN checked_at REAL;                  -- the last readable status answer
ALTER TABLE orders ADD COLUMN next_check_at REAL NOT NULL DEFAULT 0;  -- 0: due at once
-- The upstream's charge for the order, in minor units of the config's `currency` (converted with
-- `fx` when the provider bills in another one); NULL until a status answer carries a charge.
ALTER TABLE orders ADD COLUMN cost INTEGER CHECK (cost >= 0);
ALTER TABLE orders ADD COLUMN upstream_charge TEXT;             -- the same, as the upstream wrote it
ALTER TABLE orders ADD COLUMN upstream_currency TEXT;
-- What the ledger gave back for this order (kept by the trigger below: never written directly).
ALTER TABLE orders ADD COLUMN refunded INTEGER NOT NULL DEFAULT 0 CHECK (refunded >= 0);
-- The last upstream answer we could not read (unknown word, per-item error), until one we can.
ALTER TABLE orders ADD COLUMN sync_problem TEXT;

-- The active orders of a provider, by when they are due: the status loop's only query.
CREATE INDEX orders_due ON orders (provider, next_check_at)
    WHERE state = 'placed' AND status NOT IN ('Completed', 'Partial', 'Canceled');

-- Every refund, whoever writes it (status sync, failed placement, the operator), shows on its order.
CREATE TRIGGER ledger_refund_marks_order AFTER INSERT ON ledger
    WHEN NEW.kind = 'refund' AND NEW.order_id IS NOT NULL
BEGIN
    UPDATE orders SET refunded = refunded + NEW.amount WHERE id = NEW.order_id;
END;
UPDATE orders SET refunded = (
    SELECT coalesce(sum(l.amount), 0) FROM ledger l WHERE l.order_id = orders.id AND l.kind = 'refund'
);

-- Refills whose upstream outcome is still open, per provider: the refill loop's only query.
CREATE INDEX refills_open ON refills (provider, id) WHERE status NOT IN ('Completed', 'Rejected');
