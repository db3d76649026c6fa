-- Which process is placing an order ("host:pid"). At start-up a router holds only the `placing`
-- orders of processes that are gone (or that have been placing for too long): a process still
-- running on the same database (a rolling restart, the CLI re-routing an order) finishes its own.
ALTER TABLE orders ADD COLUMN placing_by TEXT;
