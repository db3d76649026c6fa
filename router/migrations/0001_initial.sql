-- Resellers, their ledger, orders, attempts, refills and upstream call records.
-- Money is INTEGER in minor units of 1e-5 (router.v2.MINOR_PER_UNIT), never REAL.

CREATE TABLE resellers (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    key_hash   TEXT    NOT NULL UNIQUE,           -- SHA-256 hex of the API key; the key is never stored
    enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    balance    INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),  -- kept by the ledger trigger only
    created_at REAL    NOT NULL
);

CREATE TABLE orders (
    id               INTEGER PRIMARY KEY,
    reseller_id      INTEGER NOT NULL REFERENCES resellers (id),
    service          INTEGER NOT NULL,            -- local service ID
    -- placing: funds reserved, routes being tried; placed: an upstream holds it; held: the
    -- outcome of an add is unknown (never re-sent by itself); failed: no route took it, refunded,
    -- unknown to the reseller; canceled: held, then canceled and refunded by the operator.
    state            TEXT    NOT NULL CHECK (state IN ('placing', 'placed', 'held', 'failed', 'canceled')),
    status           TEXT    NOT NULL DEFAULT 'Pending',  -- the v2 word the reseller sees once placed
    link             TEXT    NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity >= 0),  -- the charged quantity (runs x quantity for drip-feed)
    charge           INTEGER NOT NULL CHECK (charge >= 0),
    params           TEXT    NOT NULL,            -- JSON: the type-specific parameters sent upstream
    provider         TEXT,                        -- the route being tried, then the one that holds the order
    upstream_service INTEGER,
    upstream_order   INTEGER,
    start_count      INTEGER,
    remains          INTEGER,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL
);
CREATE INDEX orders_by_reseller ON orders (reseller_id, id);
CREATE INDEX orders_unsettled ON orders (state) WHERE state IN ('placing', 'held');

CREATE TABLE ledger (
    id          INTEGER PRIMARY KEY,
    reseller_id INTEGER NOT NULL REFERENCES resellers (id),
    order_id    INTEGER REFERENCES orders (id),
    kind        TEXT    NOT NULL CHECK (kind IN ('topup', 'adjustment', 'charge', 'refund')),
    amount      INTEGER NOT NULL CHECK (amount <> 0),
    note        TEXT,
    created_at  REAL    NOT NULL
);
CREATE INDEX ledger_by_reseller ON ledger (reseller_id, id);
-- Exactly once is the database's job: a second refund of the same order fails.
CREATE UNIQUE INDEX ledger_once_per_order ON ledger (order_id, kind) WHERE order_id IS NOT NULL;

-- Every balance change is a ledger row: the balance column follows the ledger, and the CHECK on
-- resellers.balance aborts any statement that would take it below zero.
CREATE TRIGGER ledger_moves_balance AFTER INSERT ON ledger
BEGIN
    UPDATE resellers SET balance = balance + NEW.amount WHERE id = NEW.reseller_id;
END;
CREATE TRIGGER ledger_is_append_only_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'ledger rows are never changed');
END;
CREATE TRIGGER ledger_is_append_only_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'ledger rows are never deleted');
END;
-- An order debits its charge in the statement that creates it: one round trip reserves the funds.
CREATE TRIGGER order_debits_charge AFTER INSERT ON orders WHEN NEW.charge > 0
BEGIN
    INSERT INTO ledger (reseller_id, order_id, kind, amount, created_at)
    VALUES (NEW.reseller_id, NEW.id, 'charge', -NEW.charge, NEW.created_at);
END;

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY,
    order_id         INTEGER NOT NULL REFERENCES orders (id),
    rank             INTEGER NOT NULL,            -- position in the service's route list
    provider         TEXT    NOT NULL,
    upstream_service INTEGER NOT NULL,
    started_at       REAL    NOT NULL,
    latency          REAL    NOT NULL,            -- seconds
    outcome          TEXT    NOT NULL,            -- an upstream.Outcome
    error            TEXT,
    upstream_order   INTEGER
);
CREATE INDEX attempts_by_order ON attempts (order_id);

-- What happened to an order after its creation, for `smm-router orders show`: statuses seen
-- upstream (kind 'status'), words we could not read ('unknown_status'), operator actions
-- ('resolve'), forwarded cancels and refills.
CREATE TABLE order_events (
    id       INTEGER PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders (id),
    at       REAL    NOT NULL,
    kind     TEXT    NOT NULL,
    status   TEXT,                                -- the order's v2 status after the event
    detail   TEXT                                 -- free text or JSON, for people
);
CREATE INDEX order_events_by_order ON order_events (order_id, id);

CREATE TABLE refills (
    id             INTEGER PRIMARY KEY,
    order_id       INTEGER NOT NULL REFERENCES orders (id),
    reseller_id    INTEGER NOT NULL REFERENCES resellers (id),
    provider       TEXT    NOT NULL,
    upstream_refill INTEGER NOT NULL,
    status         TEXT    NOT NULL DEFAULT 'Pending',
    created_at     REAL    NOT NULL,
    updated_at     REAL    NOT NULL
);
CREATE INDEX refills_by_reseller ON refills (reseller_id, id);

-- High-rate records, written in batches and pruned after a retention period.
CREATE TABLE upstream_calls (
    id         INTEGER PRIMARY KEY,
    provider   TEXT NOT NULL,
    action     TEXT NOT NULL,
    started_at REAL NOT NULL,
    latency    REAL NOT NULL,                     -- seconds
    outcome    TEXT NOT NULL
);
CREATE INDEX upstream_calls_by_time ON upstream_calls (started_at);
CREATE INDEX upstream_calls_by_provider ON upstream_calls (provider, action, started_at);
