-- Money per provider, for the /metrics counters: running totals kept by triggers, so that every
-- writer (the server, the CLI, a second router on the same file) moves them in the statement
-- that moves the money, and a scrape reads a few rows whatever the size of the ledger.
-- Money is INTEGER in minor units of `currency` (router.v2.MINOR_PER_UNIT), never REAL.
--
-- What each total is, for the orders placed at the provider (state `placed`; an order that
-- failed or was canceled while held was never the provider's, and its charge and refund net to
-- nothing in the ledger):
--   revenue        what resellers were charged: each order's charge, when it becomes placed
--   refunded       what the ledger gave back to resellers: each refund row of such an order
--   cost           what the provider charged us: each rise of orders.cost (the status sync's
--                  reading of the upstream charge, converted with `fx`)
--   cost_returned  what the provider gave back: each fall of orders.cost (an order that ended
--                  Partial or Canceled is charged less, down to nothing)
-- So revenue - refunded is the ledger's net for those orders, and cost - cost_returned is
-- sum(orders.cost). Each total only grows: they are Prometheus counters, and a counter that
-- fell would read as a restart (increase() would count its whole value again).
--
-- No CHECK and no NOT NULL beyond the key: a total must never be what makes an order's
-- transition or a refund fail. The triggers skip an order without a provider (none is placed
-- without one) rather than insert a NULL key.
CREATE TABLE provider_totals (
    provider      TEXT    PRIMARY KEY,
    revenue       INTEGER NOT NULL DEFAULT 0,
    refunded      INTEGER NOT NULL DEFAULT 0,
    cost          INTEGER NOT NULL DEFAULT 0,
    cost_returned INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- From the orders placed so far, in one pass in provider order through orders_by_provider (no
-- temporary sort). orders.refunded is the sum of each order's ledger refunds (migration 0002's
-- trigger), and every refund of a placed order was made while it was placed: nothing moves an
-- order out of `placed`, and one that failed or was canceled never was. Costs that fell before
-- this migration are not known as falls: they start as the cost recorded now.
INSERT INTO provider_totals (provider, revenue, refunded, cost)
    SELECT provider, sum(charge), sum(refunded), coalesce(sum(cost), 0)
    FROM orders INDEXED BY orders_by_provider
    WHERE provider IS NOT NULL AND state = 'placed'
    GROUP BY provider;

-- Revenue: the charge of each order as it becomes placed (a settle, an attach, a re-route), or
-- inserted placed (imports). The charge is the one its ledger row debited.
CREATE TRIGGER order_placed_adds_revenue AFTER UPDATE OF state ON orders
    WHEN NEW.state = 'placed' AND OLD.state <> 'placed' AND NEW.charge > 0
     AND NEW.provider IS NOT NULL
BEGIN
    INSERT INTO provider_totals (provider, revenue) VALUES (NEW.provider, NEW.charge)
    ON CONFLICT (provider) DO UPDATE SET revenue = revenue + excluded.revenue;
END;
CREATE TRIGGER order_inserted_placed_adds_revenue AFTER INSERT ON orders
    WHEN NEW.state = 'placed' AND NEW.charge > 0 AND NEW.provider IS NOT NULL
BEGIN
    INSERT INTO provider_totals (provider, revenue) VALUES (NEW.provider, NEW.charge)
    ON CONFLICT (provider) DO UPDATE SET revenue = revenue + excluded.revenue;
END;

-- Refunded: every refund row of a placed order, whoever writes it (the status sync's Partial
-- and Canceled, the operator's `orders refund`). A refund of an order that failed or was
-- canceled while held returns a charge that was never revenue: not counted.
CREATE TRIGGER ledger_refund_adds_refunded AFTER INSERT ON ledger
    WHEN NEW.kind = 'refund' AND NEW.order_id IS NOT NULL
BEGIN
    INSERT INTO provider_totals (provider, refunded)
        SELECT provider, NEW.amount FROM orders
        WHERE id = NEW.order_id AND state = 'placed' AND provider IS NOT NULL
    ON CONFLICT (provider) DO UPDATE SET refunded = refunded + excluded.refunded;
END;

-- Cost: each change of an order's recorded cost, by its delta, a rise to `cost` and a fall to
-- `cost_returned`. The provider holding an order with an upstream order never changes
-- (migration 0006), and a cost is recorded only for such orders.
CREATE TRIGGER order_cost_moves_cost AFTER UPDATE OF cost ON orders
    WHEN NEW.cost IS NOT OLD.cost AND NEW.provider IS NOT NULL
BEGIN
    INSERT INTO provider_totals (provider, cost, cost_returned)
    VALUES (NEW.provider,
            max(coalesce(NEW.cost, 0) - coalesce(OLD.cost, 0), 0),
            max(coalesce(OLD.cost, 0) - coalesce(NEW.cost, 0), 0))
    ON CONFLICT (provider) DO UPDATE SET cost = cost + excluded.cost,
                                         cost_returned = cost_returned + excluded.cost_returned;
END;
CREATE TRIGGER order_inserted_with_cost_adds_cost AFTER INSERT ON orders
    WHEN NEW.cost > 0 AND NEW.provider IS NOT NULL
BEGIN
    INSERT INTO provider_totals (provider, cost) VALUES (NEW.provider, NEW.cost)
    ON CONFLICT (provider) DO UPDATE SET cost = cost + excluded.cost;
END;

-- What the revenue counts on, kept by the schema: a placed order stays placed (its charge was
-- counted once, as it became placed), and an order's charge never changes (the ledger debited
-- it when the order was made).
CREATE TRIGGER orders_placed_stay_placed BEFORE UPDATE OF state ON orders
    WHEN OLD.state = 'placed' AND NEW.state <> 'placed'
BEGIN
    SELECT RAISE(ABORT, 'a placed order stays placed');
END;
CREATE TRIGGER orders_charge_is_final BEFORE UPDATE OF charge ON orders
    WHEN NEW.charge IS NOT OLD.charge
BEGIN
    SELECT RAISE(ABORT, 'an order''s charge never changes');
END;
