-- One row per (source, event id): the extracted columns and the raw body exactly as received.
CREATE TABLE IF NOT EXISTS events (
    source       text        NOT NULL,
    event_id     text        NOT NULL,
    -- Order of receipt, for replay; gaps are normal (a conflicting insert still takes a number).
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    event_type   text        NOT NULL,
    -- The sender's own creation time (unix seconds), when the scheme carries one.
    created      bigint,
    livemode     boolean,
    api_version  text,
    account      text,
    received_at  timestamptz NOT NULL DEFAULT now(),
    body         bytea       NOT NULL,
    PRIMARY KEY (source, event_id)
);

CREATE INDEX IF NOT EXISTS events_received_at ON events (source, received_at);
