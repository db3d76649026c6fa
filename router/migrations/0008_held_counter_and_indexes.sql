-- Cheap by construction: /healthz and a /metrics scrape read the number of held orders from a
-- counter row kept by triggers, and each rare state has an index of its own.
--
-- SQLite uses a partial index only when it can prove the query's WHERE implies the index's, and
-- it cannot prove that `state = 'held'` implies `state IN ('placing', 'held')`: orders_unsettled
-- served no query, while every count of held orders scanned the table. One partial index per
-- state costs the hot path what orders_unsettled cost (an entry added when an order is reserved,
-- removed when it is settled) and serves the queries that read that state.
DROP INDEX orders_unsettled;

-- The start-up sweep: every placing order (there are as many as adds in flight), and those
-- placing since before a bound. Keyed by updated_at, which only a failover changes. Both
-- indexes lead with the state they hold, so a query of that state is an equality SEARCH of the
-- index, never a SCAN, whatever the planner's statistics say.
CREATE INDEX orders_placing ON orders (state, updated_at) WHERE state = 'placing';

-- Held orders: `orders held`, and per provider for `check` (orders of a removed provider).
CREATE INDEX orders_held ON orders (state, provider) WHERE state = 'held';

-- Counts kept by triggers, read in O(1). One row per counter; only held orders are counted:
-- they are rare, so the hot path (reserve, settle) never writes this table. No CHECK on the
-- value: a counter must never be what makes an order's transition fail.
CREATE TABLE counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counters (name, value)
    SELECT 'orders_held', count(*) FROM orders INDEXED BY orders_held WHERE state = 'held';

-- Every way a row enters or leaves `held`. An UPDATE that changes the state names it, so
-- UPDATE OF state sees every transition (placing -> held, held -> placed, canceled, placing).
-- (INSERT OR REPLACE would delete a row without its DELETE trigger: nothing replaces orders.)
CREATE TRIGGER order_held_counted_on_insert AFTER INSERT ON orders WHEN NEW.state = 'held'
BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'orders_held';
END;
CREATE TRIGGER order_held_counted_on_update AFTER UPDATE OF state ON orders
    WHEN (OLD.state = 'held') <> (NEW.state = 'held')
BEGIN
    UPDATE counters SET value = value + (NEW.state = 'held') - (OLD.state = 'held')
    WHERE name = 'orders_held';
END;
CREATE TRIGGER order_held_counted_on_delete AFTER DELETE ON orders WHEN OLD.state = 'held'
BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'orders_held';
END;
