-- Settling a placement is ONE statement on the hot path: the order's UPDATE carries its attempts
-- as JSON, and these triggers write the attempt rows and the refund of a failed placement in
-- that same statement. Each statement is a hop to the database thread under the write lock, and
-- the lock is what bounds orders per second.

-- Transient: set by the settling UPDATE, turned into attempt rows and cleared by the trigger.
ALTER TABLE orders ADD COLUMN settling_attempts TEXT;

CREATE TRIGGER order_settling_records_attempts AFTER UPDATE OF settling_attempts ON orders
    WHEN NEW.settling_attempts IS NOT NULL
BEGIN
    INSERT INTO attempts (order_id, rank, provider, upstream_service, started_at, latency,
                          outcome, error, upstream_order)
    SELECT NEW.id,
           json_extract(value, '$.rank'),
           json_extract(value, '$.provider'),
           json_extract(value, '$.upstream_service'),
           json_extract(value, '$.started_at'),
           json_extract(value, '$.latency'),
           json_extract(value, '$.outcome'),
           json_extract(value, '$.error'),
           json_extract(value, '$.upstream_order')
    FROM json_each(NEW.settling_attempts);
    UPDATE orders SET settling_attempts = NULL WHERE id = NEW.id;
END;

-- No route took it: the charge comes back in the statement that says so.
CREATE TRIGGER order_failed_refunds AFTER UPDATE OF state ON orders
    WHEN OLD.state = 'placing' AND NEW.state = 'failed' AND NEW.charge > 0
BEGIN
    INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at)
    VALUES (NEW.reseller_id, NEW.id, 'refund', NEW.charge, 'no upstream took the order',
            NEW.updated_at);
END;
