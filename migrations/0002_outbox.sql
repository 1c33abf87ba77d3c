-- The outbox: an event is published to its Redis stream at least once. NULL until then.
ALTER TABLE events ADD COLUMN IF NOT EXISTS published_at timestamptz;

-- Only unpublished rows are indexed: the catch-up scan and the pending count stay cheap however large
-- the table grows, and an insert pays for one small index entry until its row is marked.
CREATE INDEX IF NOT EXISTS events_unpublished ON events (seq) WHERE published_at IS NULL;
