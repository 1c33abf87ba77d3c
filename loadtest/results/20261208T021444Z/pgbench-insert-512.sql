WITH inserted AS (
    INSERT INTO events (source, event_id, event_type, created, livemode, api_version, account, body)
    SELECT 'pgbench', md5(random()::text || clock_timestamp()::text || g), 'payment_intent.succeeded', 1700000000,
           false, '2026-07-29.dahlia', NULL, convert_to(repeat('x', 1024), 'UTF8')
    FROM generate_series(1, 512) AS g
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING source, event_id, seq, received_at, octet_length(body) AS body_bytes
), queued AS (
    INSERT INTO events_outbox (sources, event_ids, body_bytes)
    SELECT array_agg(source), array_agg(event_id), sum(body_bytes) FROM inserted HAVING count(*) > 0
)
SELECT source, event_id, seq, (extract(epoch FROM received_at) * 1000)::int8 FROM inserted;
