-- Rollups for the operator's reports, kept by triggers so that a report costs what it shows
-- (days x routes rows) and never a scan of history: every writer (the server, the CLI, a second
-- router on the same file) moves them in the statement that changes what they count.
-- Money is INTEGER in minor units of `currency` (router.v2.MINOR_PER_UNIT), never REAL.
--
-- A UTC day is day(t) = CAST(t / 86400 AS INTEGER): the day d holds exactly the times
-- d * 86400 <= t < (d + 1) * 86400, the comparison the reports use for the partial days at the
-- edges of a period, so an order is counted in one or the other, never both or neither. (The
-- division is rounded, but never up to the next integer: the float just below d * 86400 is at
-- least 65536/86400 of a step of d below it once divided. Times are unix seconds, never negative.)
--
-- Unlike migration 0010's counters these are net figures (they fall with a refund or a lower
-- cost): they answer "what is true of the orders of that day now", as the queries they replace
-- did. No CHECK beyond the keys: a rollup must never be what makes a write fail.

-- `smm-router providers`: the orders placed at a provider (state `placed`), per UTC day of
-- their creation and upstream service (0 for none: real upstream service IDs start at 1), as
-- Store.provider_margin summed them from the orders:
--   orders             how many
--   revenue            sum(charge - refunded): what resellers paid, net of refunds
--   cost               sum(cost) of those with a recorded cost
--   uncosted           how many have no recorded cost yet (the report costs them at the
--                      catalogue rate of their upstream service at the time of the report)
--   uncosted_quantity  sum(quantity) of those: rate x quantity is then one product per row
CREATE TABLE provider_order_days (
    provider          TEXT    NOT NULL,
    day               INTEGER NOT NULL,
    upstream_service  INTEGER NOT NULL,
    orders            INTEGER NOT NULL DEFAULT 0,
    revenue           INTEGER NOT NULL DEFAULT 0,
    cost              INTEGER NOT NULL DEFAULT 0,
    uncosted          INTEGER NOT NULL DEFAULT 0,
    uncosted_quantity INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, day, upstream_service)
) WITHOUT ROWID;

-- `add` attempts per provider, UTC day of their start, and outcome.
CREATE TABLE provider_attempt_days (
    provider TEXT    NOT NULL,
    day      INTEGER NOT NULL,
    outcome  TEXT    NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, day, outcome)
) WITHOUT ROWID;

-- `smm-router clients list`: per reseller, its orders that are not failed (the ones it was told
-- about) and the sum of its ledger. The balance column of resellers follows the ledger by its own
-- trigger (migration 0001); this sum is kept apart so that the report still shows both.
CREATE TABLE reseller_totals (
    reseller_id INTEGER PRIMARY KEY,
    orders      INTEGER NOT NULL DEFAULT 0,
    ledger      INTEGER NOT NULL DEFAULT 0
);

-- --- Backfill, from the rows that exist ---------------------------------------------------------

INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost, uncosted,
                                 uncosted_quantity)
    SELECT provider, CAST(created_at / 86400 AS INTEGER), coalesce(upstream_service, 0),
           count(*), sum(charge - refunded), coalesce(sum(cost), 0), sum(cost IS NULL),
           sum(CASE WHEN cost IS NULL THEN quantity ELSE 0 END)
    FROM orders INDEXED BY orders_by_provider
    WHERE provider IS NOT NULL AND state = 'placed'
    GROUP BY 1, 2, 3;

-- From the covering index alone (provider, outcome, started_at): the table is not read.
INSERT INTO provider_attempt_days (provider, outcome, day, attempts)
    SELECT provider, outcome, CAST(started_at / 86400 AS INTEGER), count(*)
    FROM attempts INDEXED BY attempts_by_provider
    GROUP BY 1, 2, 3;

INSERT INTO reseller_totals (reseller_id, orders, ledger)
    SELECT r.id,
           (SELECT count(*) FROM orders o INDEXED BY orders_by_reseller
            WHERE o.reseller_id = r.id AND o.state <> 'failed'),
           (SELECT coalesce(sum(l.amount), 0) FROM ledger l INDEXED BY ledger_by_reseller
            WHERE l.reseller_id = r.id)
    FROM resellers r;

-- --- provider_order_days ------------------------------------------------------------------------
-- An order counts while it is placed. It becomes placed once (a settle, an attach, a re-route,
-- or inserted placed by an import) and stays placed (migration 0010); while placed its refunded
-- (a refund row, migration 0002's trigger) and its cost (the status sync) move. The triggers
-- take every column that counts, so a change the code does not make today is counted right too.

CREATE TRIGGER order_inserted_placed_rolls_up AFTER INSERT ON orders
    WHEN NEW.state = 'placed' AND NEW.provider IS NOT NULL
BEGIN
    INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost,
                                     uncosted, uncosted_quantity)
    VALUES (NEW.provider, CAST(NEW.created_at / 86400 AS INTEGER),
            coalesce(NEW.upstream_service, 0), 1, NEW.charge - NEW.refunded,
            coalesce(NEW.cost, 0), NEW.cost IS NULL,
            CASE WHEN NEW.cost IS NULL THEN NEW.quantity ELSE 0 END)
    ON CONFLICT (provider, day, upstream_service) DO UPDATE SET
        orders = orders + excluded.orders, revenue = revenue + excluded.revenue,
        cost = cost + excluded.cost, uncosted = uncosted + excluded.uncosted,
        uncosted_quantity = uncosted_quantity + excluded.uncosted_quantity;
END;

-- Out with what the order counted for before (when it was placed), in with what it counts for
-- now (when it is placed). Fires only when one of the columns that count is set and differs.
CREATE TRIGGER order_change_rolls_up AFTER UPDATE OF state, provider, upstream_service,
                                                     created_at, charge, refunded, cost, quantity
    ON orders
    WHEN (OLD.state = 'placed' OR NEW.state = 'placed')
     AND (NEW.state IS NOT OLD.state OR NEW.provider IS NOT OLD.provider
          OR NEW.upstream_service IS NOT OLD.upstream_service
          OR NEW.created_at IS NOT OLD.created_at OR NEW.charge IS NOT OLD.charge
          OR NEW.refunded IS NOT OLD.refunded OR NEW.cost IS NOT OLD.cost
          OR NEW.quantity IS NOT OLD.quantity)
BEGIN
    INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost,
                                     uncosted, uncosted_quantity)
    SELECT OLD.provider, CAST(OLD.created_at / 86400 AS INTEGER),
           coalesce(OLD.upstream_service, 0), -1, -(OLD.charge - OLD.refunded),
           -coalesce(OLD.cost, 0), -(OLD.cost IS NULL),
           -(CASE WHEN OLD.cost IS NULL THEN OLD.quantity ELSE 0 END)
    WHERE OLD.state = 'placed' AND OLD.provider IS NOT NULL
    ON CONFLICT (provider, day, upstream_service) DO UPDATE SET
        orders = orders + excluded.orders, revenue = revenue + excluded.revenue,
        cost = cost + excluded.cost, uncosted = uncosted + excluded.uncosted,
        uncosted_quantity = uncosted_quantity + excluded.uncosted_quantity;
    INSERT INTO provider_order_days (provider, day, upstream_service, orders, revenue, cost,
                                     uncosted, uncosted_quantity)
    SELECT NEW.provider, CAST(NEW.created_at / 86400 AS INTEGER),
           coalesce(NEW.upstream_service, 0), 1, NEW.charge - NEW.refunded,
           coalesce(NEW.cost, 0), NEW.cost IS NULL,
           CASE WHEN NEW.cost IS NULL THEN NEW.quantity ELSE 0 END
    WHERE NEW.state = 'placed' AND NEW.provider IS NOT NULL
    ON CONFLICT (provider, day, upstream_service) DO UPDATE SET
        orders = orders + excluded.orders, revenue = revenue + excluded.revenue,
        cost = cost + excluded.cost, uncosted = uncosted + excluded.uncosted,
        uncosted_quantity = uncosted_quantity + excluded.uncosted_quantity;
END;

CREATE TRIGGER order_deleted_rolls_up AFTER DELETE ON orders
    WHEN OLD.state = 'placed' AND OLD.provider IS NOT NULL
BEGIN
    UPDATE provider_order_days SET
        orders = orders - 1, revenue = revenue - (OLD.charge - OLD.refunded),
        cost = cost - coalesce(OLD.cost, 0), uncosted = uncosted - (OLD.cost IS NULL),
        uncosted_quantity = uncosted_quantity
            - (CASE WHEN OLD.cost IS NULL THEN OLD.quantity ELSE 0 END)
    WHERE provider = OLD.provider AND day = CAST(OLD.created_at / 86400 AS INTEGER)
      AND upstream_service = coalesce(OLD.upstream_service, 0);
END;

-- --- provider_attempt_days ----------------------------------------------------------------------
-- Attempts are written once (the settle's trigger, migration 0009); a change made by hand is
-- followed all the same.

CREATE TRIGGER attempt_inserted_rolls_up AFTER INSERT ON attempts
BEGIN
    INSERT INTO provider_attempt_days (provider, day, outcome, attempts)
    VALUES (NEW.provider, CAST(NEW.started_at / 86400 AS INTEGER), NEW.outcome, 1)
    ON CONFLICT (provider, day, outcome) DO UPDATE SET attempts = attempts + 1;
END;
CREATE TRIGGER attempt_change_rolls_up AFTER UPDATE OF provider, started_at, outcome ON attempts
    WHEN NEW.provider IS NOT OLD.provider OR NEW.started_at IS NOT OLD.started_at
      OR NEW.outcome IS NOT OLD.outcome
BEGIN
    UPDATE provider_attempt_days SET attempts = attempts - 1
    WHERE provider = OLD.provider AND day = CAST(OLD.started_at / 86400 AS INTEGER)
      AND outcome = OLD.outcome;
    INSERT INTO provider_attempt_days (provider, day, outcome, attempts)
    VALUES (NEW.provider, CAST(NEW.started_at / 86400 AS INTEGER), NEW.outcome, 1)
    ON CONFLICT (provider, day, outcome) DO UPDATE SET attempts = attempts + 1;
END;
CREATE TRIGGER attempt_deleted_rolls_up AFTER DELETE ON attempts
BEGIN
    UPDATE provider_attempt_days SET attempts = attempts - 1
    WHERE provider = OLD.provider AND day = CAST(OLD.started_at / 86400 AS INTEGER)
      AND outcome = OLD.outcome;
END;

-- --- reseller_totals ----------------------------------------------------------------------------
-- The ledger is append-only (migration 0001): an insert is all that moves its sum. An order
-- counts while it is not failed; a failed order never comes back, but both ways are counted.

CREATE TRIGGER ledger_row_adds_to_reseller_total AFTER INSERT ON ledger
BEGIN
    INSERT INTO reseller_totals (reseller_id, ledger) VALUES (NEW.reseller_id, NEW.amount)
    ON CONFLICT (reseller_id) DO UPDATE SET ledger = ledger + excluded.ledger;
END;

CREATE TRIGGER order_inserted_counts_for_reseller AFTER INSERT ON orders
    WHEN NEW.state <> 'failed'
BEGIN
    INSERT INTO reseller_totals (reseller_id, orders) VALUES (NEW.reseller_id, 1)
    ON CONFLICT (reseller_id) DO UPDATE SET orders = orders + 1;
END;
CREATE TRIGGER order_change_counts_for_reseller AFTER UPDATE OF state, reseller_id ON orders
    WHEN (OLD.state = 'failed') IS NOT (NEW.state = 'failed')
      OR NEW.reseller_id IS NOT OLD.reseller_id
BEGIN
    INSERT INTO reseller_totals (reseller_id, orders)
    SELECT OLD.reseller_id, -1 WHERE OLD.state <> 'failed'
    ON CONFLICT (reseller_id) DO UPDATE SET orders = orders + excluded.orders;
    INSERT INTO reseller_totals (reseller_id, orders)
    SELECT NEW.reseller_id, 1 WHERE NEW.state <> 'failed'
    ON CONFLICT (reseller_id) DO UPDATE SET orders = orders + excluded.orders;
END;
CREATE TRIGGER order_deleted_counts_for_reseller AFTER DELETE ON orders
    WHEN OLD.state <> 'failed'
BEGIN
    UPDATE reseller_totals SET orders = orders - 1 WHERE reseller_id = OLD.reseller_id;
END;
