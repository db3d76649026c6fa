-- The held orders' ages (a /metrics scrape reads them every few seconds: Store.held_ages) from
-- the index alone. Migration 0008's orders_held holds (state, provider): the ages of the held
-- orders read each one's created_at from the table, one page each, about 4 ms a scrape with a
-- thousand held among a million orders. The same index with created_at as a third column
-- answers count, min and the age buckets without the table; every other query that names
-- orders_held (`orders held`, per-provider counts for `check` and the orphan warning) reads it
-- as before: the name is kept, and its first two columns are the same.
--
-- Built once at the first start after upgrading: a scan of the orders for the held ones (a
-- partial index), as 0008's was; the hot path is unchanged (an order enters it only when held).
DROP INDEX orders_held;
CREATE INDEX orders_held ON orders (state, provider, created_at) WHERE state = 'held';
