-- One local order per upstream order: an order ID of a provider belongs to at most one local
-- order, and the database refuses a second one (the settle of an accepted `add`, the operator's
-- `orders resolve --upstream-order`). Two local orders for one upstream order are two charges
-- for one delivery, or an upstream that reuses its IDs: either way a person must look.
--
-- A database written by an earlier version may hold such pairs already, and start-up must not
-- fail on them. Clearing or changing either order's upstream ID would cut the only link to a
-- real upstream order (and stop its status sync), and deciding which reseller paid twice is the
-- operator's call, not a migration's. So the pairs that exist now stay as they are, numbered:
-- in each (provider, upstream order) the oldest local order keeps upstream_duplicate = 0, the
-- later ones get 1, 2, ... and a 'duplicate' event in their history saying whose upstream order
-- it is. The unique index covers (provider, upstream_order, upstream_duplicate), and the
-- triggers below keep every other order at 0 and every recorded upstream order where it is. So
-- for each order written from now on it is exactly one local order per (provider, upstream
-- order), and none can join an old pair either: it would collide with the pair's 0.

ALTER TABLE orders ADD COLUMN upstream_duplicate INTEGER NOT NULL DEFAULT 0;

UPDATE orders SET upstream_duplicate = numbered.n
FROM (
    SELECT id, row_number() OVER (PARTITION BY provider, upstream_order ORDER BY id) - 1 AS n
    FROM orders WHERE provider IS NOT NULL AND upstream_order IS NOT NULL
) AS numbered
WHERE orders.id = numbered.id AND numbered.n > 0;

CREATE UNIQUE INDEX orders_one_per_upstream_order
    ON orders (provider, upstream_order, upstream_duplicate) WHERE upstream_order IS NOT NULL;

INSERT INTO order_events (order_id, at, kind, status, detail)
SELECT d.id, (julianday('now') - 2440587.5) * 86400.0, 'duplicate', d.status,
       'upstream order ' || d.upstream_order || ' at ' || d.provider || ' is order ' ||
       (SELECT o.id FROM orders o WHERE o.provider = d.provider
        AND o.upstream_order = d.upstream_order AND o.upstream_duplicate = 0) ||
       '''s too: two local orders for one upstream order (found by migration 0006). Ask ' ||
       d.provider || ' whether it is one order or two; if it is one, refund one of the two ' ||
       'once it has ended (`smm-router orders refund`).'
FROM orders d WHERE d.upstream_duplicate > 0;

-- Only this migration numbers duplicates.
CREATE TRIGGER orders_new_are_not_duplicates BEFORE INSERT ON orders
    WHEN NEW.upstream_duplicate <> 0
BEGIN
    SELECT RAISE(ABORT, 'upstream_duplicate is only set by migration 0006');
END;
CREATE TRIGGER orders_duplicates_stay_numbered BEFORE UPDATE OF upstream_duplicate ON orders
    WHEN NEW.upstream_duplicate IS NOT OLD.upstream_duplicate
BEGIN
    SELECT RAISE(ABORT, 'upstream_duplicate is only set by migration 0006');
END;
-- Once an order has its upstream order, neither that ID nor the provider holding it changes.
CREATE TRIGGER orders_upstream_order_is_final BEFORE UPDATE OF provider, upstream_order ON orders
    WHEN OLD.upstream_order IS NOT NULL
     AND (NEW.provider IS NOT OLD.provider OR NEW.upstream_order IS NOT OLD.upstream_order)
BEGIN
    SELECT RAISE(ABORT, 'an order''s upstream order never changes once recorded');
END;
