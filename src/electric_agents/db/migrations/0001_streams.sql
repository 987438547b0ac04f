-- Durable Streams storage: stream metadata, messages, idempotent-producer state.
-- Offsets are "0000000000000000_<16-digit byte position>"; only the byte part is stored,
-- as the end position of each message (spec/01 §A.3).

CREATE TABLE ds_streams (
    id               bigserial PRIMARY KEY,
    path             text NOT NULL UNIQUE,
    content_type     text NOT NULL,
    ttl_seconds      bigint,
    expires_at       text,              -- as the client sent it, echoed on HEAD
    expires_at_ts    timestamptz,
    last_access_at   timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    tail             bigint NOT NULL DEFAULT 0,
    closed           boolean NOT NULL DEFAULT false,
    closed_by_producer text,
    closed_by_epoch  bigint,
    closed_by_seq    bigint,
    last_stream_seq  text,
    forked_from      bigint,
    forked_from_path text,
    fork_offset      bigint,
    fork_sub_offset  integer NOT NULL DEFAULT 0,
    -- Ancestors of a fork, oldest first, with the highest offset each one contributes.
    lineage_ids      bigint[] NOT NULL DEFAULT '{}',
    lineage_bounds   bigint[] NOT NULL DEFAULT '{}',
    ref_count        integer NOT NULL DEFAULT 0,
    soft_deleted     boolean NOT NULL DEFAULT false
);

CREATE INDEX ds_streams_expiry_idx ON ds_streams (expires_at_ts) WHERE expires_at_ts IS NOT NULL;
CREATE INDEX ds_streams_ttl_idx ON ds_streams (id) WHERE ttl_seconds IS NOT NULL;

CREATE TABLE ds_messages (
    stream_id  bigint NOT NULL,
    off        bigint NOT NULL,
    data       bytea NOT NULL,
    PRIMARY KEY (stream_id, off)
);

CREATE TABLE ds_producers (
    stream_id    bigint NOT NULL,
    producer_id  text NOT NULL,
    epoch        bigint NOT NULL,
    last_seq     bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, producer_id)
);

-- Settings that must survive restarts, such as the webhook signing key.
CREATE TABLE server_secrets (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One round trip per append batch. The writer validated the batch in memory against the
-- stream state it last saw; this checks that state still holds (no other process appended,
-- closed or deleted the streams; streams it caches cannot expire), and only then writes.
-- Returns the ids whose state moved on, having written nothing; the writer then takes its
-- locking path, which calls this again inside the transaction holding the row locks.
CREATE FUNCTION ds_append_batch(
    p_ids bigint[], p_expected_tails bigint[], p_expected_closed boolean[],
    p_new_tails bigint[], p_new_closed boolean[],
    p_closed_by_producer text[], p_closed_by_epoch bigint[], p_closed_by_seq bigint[],
    p_last_stream_seq text[],
    p_msg_stream_ids bigint[], p_msg_offsets bigint[], p_msg_data bytea[],
    p_prod_stream_ids bigint[], p_prod_ids text[], p_prod_epochs bigint[], p_prod_seqs bigint[],
    p_channel text, p_notify_payloads text[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint[];
    payload text;
BEGIN
    SELECT coalesce(array_agg(e.id), '{}') INTO moved
    FROM unnest(p_ids, p_expected_tails, p_expected_closed) AS e(id, tail, closed)
    LEFT JOIN (
        SELECT s.id, s.tail, s.closed, s.soft_deleted
        FROM ds_streams s WHERE s.id = ANY(p_ids) ORDER BY s.id FOR UPDATE
    ) s ON s.id = e.id
    WHERE s.id IS NULL OR s.tail <> e.tail OR s.closed <> e.closed OR s.soft_deleted;
    IF cardinality(moved) > 0 THEN
        RETURN moved;
    END IF;

    INSERT INTO ds_messages (stream_id, off, data)
    SELECT * FROM unnest(p_msg_stream_ids, p_msg_offsets, p_msg_data);

    UPDATE ds_streams s SET
        tail = u.tail, closed = u.closed, closed_by_producer = u.cbp,
        closed_by_epoch = u.cbe, closed_by_seq = u.cbs, last_stream_seq = u.lss,
        last_access_at = now()
    FROM unnest(p_ids, p_new_tails, p_new_closed, p_closed_by_producer, p_closed_by_epoch,
                p_closed_by_seq, p_last_stream_seq) AS u(id, tail, closed, cbp, cbe, cbs, lss)
    WHERE s.id = u.id;

    INSERT INTO ds_producers (stream_id, producer_id, epoch, last_seq)
    SELECT * FROM unnest(p_prod_stream_ids, p_prod_ids, p_prod_epochs, p_prod_seqs)
    ON CONFLICT (stream_id, producer_id)
    DO UPDATE SET epoch = EXCLUDED.epoch, last_seq = EXCLUDED.last_seq, updated_at = now();

    FOREACH payload IN ARRAY p_notify_payloads LOOP
        PERFORM pg_notify(p_channel, payload);
    END LOOP;
    RETURN '{}';
END
$$;
