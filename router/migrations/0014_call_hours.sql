-- Upstream call rollups per hour, beside the minute ones (0012): latency percentiles over a
-- period read its whole hours here and only its first and last hours' minutes, so that the
-- providers report costs what its period holds in hours (720 rows per provider, action and
-- outcome for 30 days), not in minutes (43,200).
--
-- An hour row is always the sum of the minute rows of that hour, kept so by the triggers below
-- in the statement that changes a minute row: rolled up, added to, or pruned (deleting minutes
-- past the retention takes their calls out of their hour, and an hour left without calls goes).
-- No code writes it. `hour` is the unix time (UTC) of the hour's start, a multiple of 3600.
CREATE TABLE upstream_call_hours (
    provider   TEXT    NOT NULL,
    hour       INTEGER NOT NULL,
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
    PRIMARY KEY (provider, hour, action, outcome),
    CHECK (calls = b_5ms + b_10ms + b_25ms + b_50ms + b_100ms + b_250ms + b_500ms + b_1s
                   + b_2_5s + b_5s + b_10s + b_30s + b_inf)
) WITHOUT ROWID;

INSERT INTO upstream_call_hours (provider, hour, action, outcome,
                                 calls, latency_us, b_5ms, b_10ms, b_25ms, b_50ms, b_100ms,
                                 b_250ms, b_500ms, b_1s, b_2_5s, b_5s, b_10s, b_30s, b_inf)
    SELECT provider, minute / 3600 * 3600, action, outcome,
           sum(calls), sum(latency_us), sum(b_5ms), sum(b_10ms), sum(b_25ms), sum(b_50ms),
           sum(b_100ms), sum(b_250ms), sum(b_500ms), sum(b_1s), sum(b_2_5s), sum(b_5s),
           sum(b_10s), sum(b_30s), sum(b_inf)
    FROM upstream_call_minutes
    GROUP BY provider, minute / 3600 * 3600, action, outcome;

CREATE TRIGGER call_minute_inserted_rolls_up AFTER INSERT ON upstream_call_minutes
BEGIN
    INSERT INTO upstream_call_hours (provider, hour, action, outcome,
                                     calls, latency_us, b_5ms, b_10ms, b_25ms, b_50ms, b_100ms,
                                     b_250ms, b_500ms, b_1s, b_2_5s, b_5s, b_10s, b_30s, b_inf)
    VALUES (NEW.provider, NEW.minute / 3600 * 3600, NEW.action, NEW.outcome,
            NEW.calls, NEW.latency_us, NEW.b_5ms, NEW.b_10ms, NEW.b_25ms, NEW.b_50ms,
            NEW.b_100ms, NEW.b_250ms, NEW.b_500ms, NEW.b_1s, NEW.b_2_5s, NEW.b_5s, NEW.b_10s,
            NEW.b_30s, NEW.b_inf)
    ON CONFLICT (provider, hour, action, outcome) DO UPDATE SET
        calls = calls + excluded.calls, latency_us = latency_us + excluded.latency_us,
        b_5ms = b_5ms + excluded.b_5ms, b_10ms = b_10ms + excluded.b_10ms,
        b_25ms = b_25ms + excluded.b_25ms, b_50ms = b_50ms + excluded.b_50ms,
        b_100ms = b_100ms + excluded.b_100ms, b_250ms = b_250ms + excluded.b_250ms,
        b_500ms = b_500ms + excluded.b_500ms, b_1s = b_1s + excluded.b_1s,
        b_2_5s = b_2_5s + excluded.b_2_5s, b_5s = b_5s + excluded.b_5s,
        b_10s = b_10s + excluded.b_10s, b_30s = b_30s + excluded.b_30s,
        b_inf = b_inf + excluded.b_inf;
END;

-- A minute row added to (a later batch of its calls): its hour gets the difference. A key
-- column changed (no code does it) moves the row's calls from the old hour to the new one.
CREATE TRIGGER call_minute_changed_rolls_up AFTER UPDATE ON upstream_call_minutes
BEGIN
    UPDATE upstream_call_hours SET
        calls = calls - OLD.calls, latency_us = latency_us - OLD.latency_us,
        b_5ms = b_5ms - OLD.b_5ms, b_10ms = b_10ms - OLD.b_10ms, b_25ms = b_25ms - OLD.b_25ms,
        b_50ms = b_50ms - OLD.b_50ms, b_100ms = b_100ms - OLD.b_100ms,
        b_250ms = b_250ms - OLD.b_250ms, b_500ms = b_500ms - OLD.b_500ms,
        b_1s = b_1s - OLD.b_1s, b_2_5s = b_2_5s - OLD.b_2_5s, b_5s = b_5s - OLD.b_5s,
        b_10s = b_10s - OLD.b_10s, b_30s = b_30s - OLD.b_30s, b_inf = b_inf - OLD.b_inf
    WHERE provider = OLD.provider AND hour = OLD.minute / 3600 * 3600
      AND action = OLD.action AND outcome = OLD.outcome;
    INSERT INTO upstream_call_hours (provider, hour, action, outcome,
                                     calls, latency_us, b_5ms, b_10ms, b_25ms, b_50ms, b_100ms,
                                     b_250ms, b_500ms, b_1s, b_2_5s, b_5s, b_10s, b_30s, b_inf)
    VALUES (NEW.provider, NEW.minute / 3600 * 3600, NEW.action, NEW.outcome,
            NEW.calls, NEW.latency_us, NEW.b_5ms, NEW.b_10ms, NEW.b_25ms, NEW.b_50ms,
            NEW.b_100ms, NEW.b_250ms, NEW.b_500ms, NEW.b_1s, NEW.b_2_5s, NEW.b_5s, NEW.b_10s,
            NEW.b_30s, NEW.b_inf)
    ON CONFLICT (provider, hour, action, outcome) DO UPDATE SET
        calls = calls + excluded.calls, latency_us = latency_us + excluded.latency_us,
        b_5ms = b_5ms + excluded.b_5ms, b_10ms = b_10ms + excluded.b_10ms,
        b_25ms = b_25ms + excluded.b_25ms, b_50ms = b_50ms + excluded.b_50ms,
        b_100ms = b_100ms + excluded.b_100ms, b_250ms = b_250ms + excluded.b_250ms,
        b_500ms = b_500ms + excluded.b_500ms, b_1s = b_1s + excluded.b_1s,
        b_2_5s = b_2_5s + excluded.b_2_5s, b_5s = b_5s + excluded.b_5s,
        b_10s = b_10s + excluded.b_10s, b_30s = b_30s + excluded.b_30s,
        b_inf = b_inf + excluded.b_inf;
    DELETE FROM upstream_call_hours
    WHERE provider = OLD.provider AND hour = OLD.minute / 3600 * 3600
      AND action = OLD.action AND outcome = OLD.outcome AND calls = 0;
END;

CREATE TRIGGER call_minute_deleted_rolls_up AFTER DELETE ON upstream_call_minutes
BEGIN
    UPDATE upstream_call_hours SET
        calls = calls - OLD.calls, latency_us = latency_us - OLD.latency_us,
        b_5ms = b_5ms - OLD.b_5ms, b_10ms = b_10ms - OLD.b_10ms, b_25ms = b_25ms - OLD.b_25ms,
        b_50ms = b_50ms - OLD.b_50ms, b_100ms = b_100ms - OLD.b_100ms,
        b_250ms = b_250ms - OLD.b_250ms, b_500ms = b_500ms - OLD.b_500ms,
        b_1s = b_1s - OLD.b_1s, b_2_5s = b_2_5s - OLD.b_2_5s, b_5s = b_5s - OLD.b_5s,
        b_10s = b_10s - OLD.b_10s, b_30s = b_30s - OLD.b_30s, b_inf = b_inf - OLD.b_inf
    WHERE provider = OLD.provider AND hour = OLD.minute / 3600 * 3600
      AND action = OLD.action AND outcome = OLD.outcome;
    DELETE FROM upstream_call_hours
    WHERE provider = OLD.provider AND hour = OLD.minute / 3600 * 3600
      AND action = OLD.action AND outcome = OLD.outcome AND calls = 0;
END;
