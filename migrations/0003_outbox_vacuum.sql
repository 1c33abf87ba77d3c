-- The outbox sees an insert and a delete per event: vacuum it after a fixed number of dead rows, not a
-- fraction of its (tiny) live size, and without cost-based throttling, so dead tuples do not pile up
-- between autovacuum rounds and slow the index scans of the catch-up.
ALTER TABLE events_outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 10000
);
