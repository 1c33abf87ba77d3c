-- The outbox: one narrow row per stored event not yet published to its Redis stream. It is written in
-- the same statement as the event, and deleted once the event is on the stream.
--
-- A separate table rather than a `published_at` column on events: marking a 1 KiB event row published
-- would rewrite the whole row (and its index entries) in the WAL; deleting a 60-byte outbox row does not.
CREATE TABLE IF NOT EXISTS events_outbox (
    seq       bigint      PRIMARY KEY,
    source    text        NOT NULL,
    event_id  text        NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);
