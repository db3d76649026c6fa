-- Upstream call records that stay bounded: each call is rolled up into one row per provider,
-- minute, action and outcome, and its raw row is deleted after a short raw retention
-- (router.store.calls). Latency percentiles read the rollups' histograms: their cost follows
-- the minutes of the period asked for, not the number of calls in it.
--
-- `minute` is the unix time (UTC) of the minute's start, a multiple of 60. `latency_us` is the
-- sum of the calls' latencies in whole microseconds (each rounded). The histogram counts the
-- calls by latency, in seconds, in (previous bound, bound]: the bounds of the router's
-- Prometheus latency histograms (router.store.calls.CALL_LATENCY_BUCKETS, which
-- router/metrics.py uses too), the last column counting what lies beyond 30 s. Changing those
-- bounds takes a new migration: a rollup cannot be split again.
CREATE TABLE upstream_call_minutes (
    provider   TEXT    NOT NULL,
    minute     INTEGER NOT NULL,
    action     TEXT    NOT NULL,
    outcome    TEXT    NOT NULL,
    calls      INTEGER NOT NULL,
    latency_us INTEGER NOT NULL,
    b_5ms      INTEGER NOT NULL,
    b_10ms     INTEGER NOT NULL,
    b_25ms     INTEGER NOT NULL,
    b_50ms     INTEGER NOT NULL,
    b_100ms    INTEGER NOT NULL,
    b_250ms    INTEGER NOT NULL,
    b_500ms    INTEGER NOT NULL,
    b_1s       INTEGER NOT NULL,
    b_2_5s     INTEGER NOT NULL,
    b_5s       INTEGER NOT NULL,
    b_10s      INTEGER NOT NULL,
    b_30s      INTEGER NOT NULL,
    b_inf      INTEGER NOT NULL,
    PRIMARY KEY (provider, minute, action, outcome),
    CHECK (calls = b_5ms + b_10ms + b_25ms + b_50ms + b_100ms + b_250ms + b_500ms + b_1s
                   + b_2_5s + b_5s + b_10s + b_30s + b_inf)
) WITHOUT ROWID;

-- The rollups past the retention are deleted oldest minute first, in batches.
CREATE INDEX upstream_call_minutes_by_minute ON upstream_call_minutes (minute);

-- The watermark: every upstream_calls row with an id up to this value is in the rollups, and
-- none above it. It moves in the transaction that rolls rows up, so that a row is rolled up
-- exactly once; raw rows at or below it wait only for their deletion, and every reader skips
-- them. (A row of `counters`, migration 0008, read in O(1) by its name.)
INSERT INTO counters (name, value)
    SELECT 'upstream_calls_rolled_up', coalesce(max(id), 0) FROM upstream_calls;

-- Every call recorded so far, in one pass. Their raw rows stay: the router deletes them in
-- small batches once they are past the raw retention, never in one long transaction here.
INSERT INTO upstream_call_minutes
    (provider, minute, action, outcome, calls, latency_us, b_5ms, b_10ms, b_25ms, b_50ms,
     b_100ms, b_250ms, b_500ms, b_1s, b_2_5s, b_5s, b_10s, b_30s, b_inf)
    SELECT provider, CAST(started_at AS INTEGER) / 60 * 60, action, outcome, count(*),
           sum(CAST(round(latency * 1000000) AS INTEGER)),
           sum(latency <= 0.005),
           sum(latency > 0.005 AND latency <= 0.01),
           sum(latency > 0.01 AND latency <= 0.025),
           sum(latency > 0.025 AND latency <= 0.05),
           sum(latency > 0.05 AND latency <= 0.1),
           sum(latency > 0.1 AND latency <= 0.25),
           sum(latency > 0.25 AND latency <= 0.5),
           sum(latency > 0.5 AND latency <= 1.0),
           sum(latency > 1.0 AND latency <= 2.5),
           sum(latency > 2.5 AND latency <= 5.0),
           sum(latency > 5.0 AND latency <= 10.0),
           sum(latency > 10.0 AND latency <= 30.0),
           sum(latency > 30.0)
    FROM upstream_calls
    WHERE id <= (SELECT value FROM counters WHERE name = 'upstream_calls_rolled_up')
    GROUP BY provider, CAST(started_at AS INTEGER) / 60 * 60, action, outcome;
