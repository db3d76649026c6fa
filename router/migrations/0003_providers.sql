-- Provider balances and catalogues, and the indexes of the per-provider reports.
-- Money is INTEGER in minor units (router.v2.MINOR_PER_UNIT), never REAL.

-- Every balance read (the balance loop, every `sync.balance_interval`), pruned after a retention
-- period except each provider's last one.
CREATE TABLE provider_balances (
    id       INTEGER PRIMARY KEY,
    provider TEXT    NOT NULL,
    balance  INTEGER NOT NULL,                    -- minor units of `currency`; may be negative
    currency TEXT    NOT NULL,                    -- as the provider answered it
    read_at  REAL    NOT NULL                     -- unix time the read was sent
);
CREATE INDEX provider_balances_by_provider ON provider_balances (provider, read_at);

-- The last usable catalogue of each provider (a broken answer never replaces it).
CREATE TABLE provider_catalogues (
    provider   TEXT    PRIMARY KEY,
    fetched_at REAL    NOT NULL,
    services   INTEGER NOT NULL                   -- entries in that catalogue
);

-- What the provider's catalogue says of each upstream service a route points at. A service
-- missing from a usable catalogue keeps its last known terms with present = 0: routing skips it.
CREATE TABLE route_catalogue (
    provider   TEXT    NOT NULL,
    service    INTEGER NOT NULL,                  -- the upstream service ID
    present    INTEGER NOT NULL CHECK (present IN (0, 1)),
    name       TEXT,                              -- NULL: never listed
    type       TEXT,
    rate       INTEGER CHECK (rate >= 0),         -- per 1000 (per package for flat types), minor units of the provider's currency
    min        INTEGER,
    max        INTEGER,
    refill     INTEGER CHECK (refill IN (0, 1)),
    cancel     INTEGER CHECK (cancel IN (0, 1)),
    dripfeed   INTEGER CHECK (dripfeed IN (0, 1)),
    seen_at    REAL,                              -- the last catalogue that listed it
    checked_at REAL    NOT NULL,                  -- the last catalogue compared with it
    PRIMARY KEY (provider, service)
);

-- Reports by provider over a period: orders by creation time, attempts by outcome (add success
-- rate, the last `Not enough funds`).
CREATE INDEX orders_by_provider ON orders (provider, created_at);
CREATE INDEX attempts_by_provider ON attempts (provider, outcome, started_at);
