-- Reseller request IDs (an idempotent `add`) and the open refill of an order.

-- The reseller's own ID for an `add` (its `request_id` parameter or `Idempotency-Key` header),
-- NULL when it sent none: 1 to 64 printable ASCII characters (0x21-0x7E, no spaces). The API
-- refuses anything else first; the CHECK is the backstop for every other writer.
ALTER TABLE orders ADD COLUMN request_id TEXT
    CHECK (request_id IS NULL OR (length(request_id) BETWEEN 1 AND 64
                                  AND request_id NOT GLOB '*[^!-~]*'));
-- One order per (reseller, request ID), whatever became of it: the reserving INSERT skips a
-- repeat (ON CONFLICT DO NOTHING) and the repeat answers the first order, found through this.
CREATE UNIQUE INDEX orders_by_request_id ON orders (reseller_id, request_id)
    WHERE request_id IS NOT NULL;

-- The refill still open of each order: a second refill while one is open answers that one and
-- sends nothing upstream. Not UNIQUE: databases from before may hold two open refills of one
-- order, and the refill loop closes them in time.
CREATE INDEX refills_open_by_order ON refills (order_id)
    WHERE status NOT IN ('Completed', 'Rejected');
