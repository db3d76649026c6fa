-- The `providers` report costs an order without a recorded cost at the cost its route was
-- planned at when it was placed (orders.estimated_cost, migration 0009: catalogue rate x
-- quantity with `fx`, minor units of `currency`), which is what the provider charged then, and
-- only an order without that either at its route's catalogue rate at the time of the report.
-- A rate a provider changed since no longer moves the margins of the orders it already took.
--
-- provider_order_days (migration 0011) gets what that takes, per row (provider, day, upstream
-- service), over the placed orders of the row:
--   cost               sum(cost) of those with a recorded cost (as in 0011)
--   planned            how many have no recorded cost and a planned one (estimated_cost)
--   planned_cost       sum(estimated_cost) of those: already converted, added as it is
--   uncosted           how many have neither (in 0011: every order without a recorded cost);
--                      the report costs them at the catalogue rate of their upstream service
--   uncosted_quantity  sum(quantity) of those, as in 0011
-- so that each placed order counts in exactly one of cost, planned and uncosted. Money is
-- INTEGER in minor units, never REAL; no CHECK: a rollup must never be what makes a write fail.
ALTER TABLE provider_order_days ADD COLUMN planned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE provider_order_days ADD COLUMN planned_cost INTEGER NOT NULL DEFAULT 0;

-- --- The triggers, counting the planned costs ---------------------------------------------------
-- 0011's three, with the same events and the same two steps of the update: an order counts
-- in `planned` or `uncosted` by its estimated_cost too, so a change of it is followed (no code
-- changes it once the order is placed today; a settle sets it with the state, one firing).

DROP TRIGGER order_inserted_placed_rolls_up;
DROP TRIGGER order_change_rolls_up;
DROP TRIGGER order_deleted_rolls_up;

CREATE TRIGGER order_inserted_placed_rolls_up AFTER INSERT ON orders
    WHEN NEW.state = 'placed' AND NEW.provider IS NOT NULL
BEGIN
    INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost,
                                     planned, planned_cost, uncosted, uncosted_quantity)
    VALUES (NEW.provider, CAST(NEW.created_at / 86400 AS INTEGER),
            coalesce(NEW.upstream_service, 0), 1, NEW.charge - NEW.refunded,
            coalesce(NEW.cost, 0), NEW.cost IS NULL AND NEW.estimated_cost IS NOT NULL,
            CASE WHEN NEW.cost IS NULL THEN coalesce(NEW.estimated_cost, 0) ELSE 0 END,
            coalesce(NEW.cost, NEW.estimated_cost) IS NULL,
            CASE WHEN coalesce(NEW.cost, NEW.estimated_cost) IS NULL THEN NEW.quantity ELSE 0 END)
    ON CONFLICT (provider, day, upstream_service) DO UPDATE SET
        orders = orders + excluded.orders, revenue = revenue + excluded.revenue,
        cost = cost + excluded.cost, planned = planned + excluded.planned,
        planned_cost = planned_cost + excluded.planned_cost,
        uncosted = uncosted + excluded.uncosted,
        uncosted_quantity = uncosted_quantity + excluded.uncosted_quantity;
END;

-- Out with what the order counted for before (when it was placed), in with what it counts for
-- now (when it is placed). Fires only when one of the columns that count is set and differs.
CREATE TRIGGER order_change_rolls_up AFTER UPDATE OF state, provider, upstream_service,
                                                     created_at, charge, refunded, cost,
                                                     estimated_cost, quantity
    ON orders
    WHEN (OLD.state = 'placed' OR NEW.state = 'placed')
     AND (NEW.state IS NOT OLD.state OR NEW.provider IS NOT OLD.provider
          OR NEW.upstream_service IS NOT OLD.upstream_service
          OR NEW.created_at IS NOT OLD.created_at OR NEW.charge IS NOT OLD.charge
          OR NEW.refunded IS NOT OLD.refunded OR NEW.cost IS NOT OLD.cost
          OR NEW.estimated_cost IS NOT OLD.estimated_cost OR NEW.quantity IS NOT OLD.quantity)
BEGIN
    INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost,
                                     planned, planned_cost, uncosted, uncosted_quantity)
    SELECT OLD.provider, CAST(OLD.created_at / 86400 AS INTEGER),
           coalesce(OLD.upstream_service, 0), -1, -(OLD.charge - OLD.refunded),
           -coalesce(OLD.cost, 0), -(OLD.cost IS NULL AND OLD.estimated_cost IS NOT NULL),
           -(CASE WHEN OLD.cost IS NULL THEN coalesce(OLD.estimated_cost, 0) ELSE 0 END),
           -(coalesce(OLD.cost, OLD.estimated_cost) IS NULL),
           -(CASE WHEN coalesce(OLD.cost, OLD.estimated_cost) IS NULL THEN OLD.quantity
             ELSE 0 END)
    WHERE OLD.state = 'placed' AND OLD.provider IS NOT NULL
    ON CONFLICT (provider, day, upstream_service) DO UPDATE SET
        orders = orders + excluded.orders, revenue = revenue + excluded.revenue,
        cost = cost + excluded.cost, planned = planned + excluded.planned,
        planned_cost = planned_cost + excluded.planned_cost,
        uncosted = uncosted + excluded.uncosted,
        uncosted_quantity = uncosted_quantity + excluded.uncosted_quantity;
    INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost,
                                     planned, planned_cost, uncosted, uncosted_quantity)
    SELECT NEW.provider, CAST(NEW.created_at / 86400 AS INTEGER),
           coalesce(NEW.upstream_service, 0), 1, NEW.charge - NEW.refunded,
           coalesce(NEW.cost, 0), NEW.cost IS NULL AND NEW.estimated_cost IS NOT NULL,
           CASE WHEN NEW.cost IS NULL THEN coalesce(NEW.estimated_cost, 0) ELSE 0 END,
           coalesce(NEW.cost, NEW.estimated_cost) IS NULL,
           CASE WHEN coalesce(NEW.cost, NEW.estimated_cost) IS NULL THEN NEW.quantity ELSE 0 END
    WHERE NEW.state = 'placed' AND NEW.provider IS NOT NULL
    ON CONFLICT (provider, day, upstream_service) DO UPDATE SET
        orders = orders + excluded.orders, revenue = revenue + excluded.revenue,
        cost = cost + excluded.cost, planned = planned + excluded.planned,
        planned_cost = planned_cost + excluded.planned_cost,
        uncosted = uncosted + excluded.uncosted,
        uncosted_quantity = uncosted_quantity + excluded.uncosted_quantity;
END;

CREATE TRIGGER order_deleted_rolls_up AFTER DELETE ON orders
    WHEN OLD.state = 'placed' AND OLD.provider IS NOT NULL
BEGIN
    UPDATE provider_order_days SET
        orders = orders - 1, revenue = revenue - (OLD.charge - OLD.refunded),
        cost = cost - coalesce(OLD.cost, 0),
        planned = planned - (OLD.cost IS NULL AND OLD.estimated_cost IS NOT NULL),
        planned_cost = planned_cost
            - (CASE WHEN OLD.cost IS NULL THEN coalesce(OLD.estimated_cost, 0) ELSE 0 END),
        uncosted = uncosted - (coalesce(OLD.cost, OLD.estimated_cost) IS NULL),
        uncosted_quantity = uncosted_quantity
            - (CASE WHEN coalesce(OLD.cost, OLD.estimated_cost) IS NULL THEN OLD.quantity
               ELSE 0 END)
    WHERE provider = OLD.provider AND day = CAST(OLD.created_at / 86400 AS INTEGER)
      AND upstream_service = coalesce(OLD.upstream_service, 0);
END;

-- --- Backfill: every row again, from the orders -------------------------------------------------
-- The rows 0011's triggers kept count a planned order as uncosted: recomputed whole from the
-- placed orders, in this migration's transaction (no write to orders comes between the new
-- triggers and this), through orders_by_provider (provider, created_at) as 0011's backfill: a
-- search of the index by provider, never a SCAN of orders.

DELETE FROM provider_order_days;

INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost, planned,
                                 planned_cost, uncosted, uncosted_quantity)
    SELECT provider, CAST(created_at / 86400 AS INTEGER), coalesce(upstream_service, 0),
           count(*), sum(charge - refunded), coalesce(sum(cost), 0),
           sum(cost IS NULL AND estimated_cost IS NOT NULL),
           sum(CASE WHEN cost IS NULL THEN coalesce(estimated_cost, 0) ELSE 0 END),
           sum(coalesce(cost, estimated_cost) IS NULL),
           sum(CASE WHEN coalesce(cost, estimated_cost) IS NULL THEN quantity ELSE 0 END)
    FROM orders INDEXED BY orders_by_provider
    WHERE provider IS NOT NULL AND state = 'placed'
    GROUP BY 1, 2, 3;
