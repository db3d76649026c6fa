-- Routing records: the config that routed each order and the upstream cost it was routed at,
-- the cost of each attempt (the funds bench replays it), the breaker's transitions, and the
-- index of the quality strategy's outcomes. Money is INTEGER minor units, never REAL.

-- The version (Config.version, a short hash of the file) of the config that planned the order.
-- NULL for orders from before it was recorded.
ALTER TABLE orders ADD COLUMN config_version TEXT;
-- The upstream cost the route that took the order was planned at (catalogue rate x quantity,
-- with `fx`), minor units of `currency`; NULL when no catalogue rate was known. It counts in the
-- provider's spend of the day until a status answer records the real cost.
ALTER TABLE orders ADD COLUMN estimated_cost INTEGER CHECK (estimated_cost >= 0);
-- The upstream cost of the order on this attempt's route, as planned (NULL: unknown): after a
-- restart the funds bench is replayed from the `no_funds` attempts and their costs.
ALTER TABLE attempts ADD COLUMN cost INTEGER CHECK (cost >= 0);

-- Migration 0004's trigger, writing the attempts' costs too.
DROP TRIGGER order_settling_records_attempts;
CREATE TRIGGER order_settling_records_attempts AFTER UPDATE OF settling_attempts ON orders
    WHEN NEW.settling_attempts IS NOT NULL
BEGIN
    INSERT INTO attempts (order_id, rank, provider, upstream_service, started_at, latency,
                          outcome, error, upstream_order, cost)
    SELECT NEW.id,
           json_extract(value, '$.rank'),
           json_extract(value, '$.provider'),
           json_extract(value, '$.upstream_service'),
           json_extract(value, '$.started_at'),
           json_extract(value, '$.latency'),
           json_extract(value, '$.outcome'),
           json_extract(value, '$.error'),
           json_extract(value, '$.upstream_order'),
           json_extract(value, '$.cost')
    FROM json_each(NEW.settling_attempts);
    UPDATE orders SET settling_attempts = NULL WHERE id = NEW.id;
END;

-- Each transition of a provider's breaker, as the process that saw it wrote it: 'open' when it
-- opened (or a failed probe reopened it), 'healthy' when a probe closed it. Half-open is not
-- stored: it is `open` once the config's `health.cooldown` has passed. A restarted server and
-- `smm-router routes` read the last row of each provider. Rare by nature (a transition, not a
-- call); pruned with the balance reads, except each provider's last row.
CREATE TABLE breaker_events (
    id       INTEGER PRIMARY KEY,
    provider TEXT    NOT NULL,
    at       REAL    NOT NULL,                    -- unix time
    state    TEXT    NOT NULL CHECK (state IN ('open', 'healthy'))
);
CREATE INDEX breaker_events_by_provider ON breaker_events (provider, at);

-- The final outcomes the status sync recorded, by when it read them: the quality strategy's
-- query (the last 7 days, grouped by provider and upstream service) reads only this index
-- (`state` too: SQLite does not take a column the partial WHERE fixes as covered).
CREATE INDEX orders_final ON orders (checked_at, provider, upstream_service, status, quantity,
                                     remains, state)
    WHERE state = 'placed' AND status IN ('Completed', 'Partial', 'Canceled');
