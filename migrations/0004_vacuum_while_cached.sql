-- Vacuum the tables in small rounds, while the pages they visit are still in shared_buffers.
--
-- events is insert-only, yet autovacuum must visit every new page once (to mark it all-visible and
-- freeze it later). By default that happens after 20% of the table has been inserted: by then the pages
-- were written out long ago, so the vacuum reads each one back and writes it a second time. Measured at
-- 14,000 events/s on a table of ~850,000 events: 141,133 pages (1.1 GB) read and rewritten at 30 MB/s for
-- 37 s. With a round every 50,000 inserted rows (and autovacuum_naptime = 5s on the server), each round
-- visited ~12,000 pages that were still in shared_buffers and dirtied none of them: 0.3 s, no I/O.
ALTER TABLE events SET (
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000
);

-- The outbox, vacuumed unthrottled (0003) but only once per autovacuum_naptime, grew to ~100 MB of dead
-- rows between rounds and was then vacuumed as one ~150 MB burst of writes in 0.6 s, which stalls the
-- WAL flushes that durable acks wait for. Vacuumed every few seconds it stays a few MB, and the default
-- cost-based throttling spreads what I/O is left.
ALTER TABLE events_outbox RESET (autovacuum_vacuum_cost_delay);
