-- Appends commit through one plain SQL statement (streams/writer.py `_APPEND_BATCH`) instead
-- of the ds_append_batch function: without a PL/pgSQL call a batch costs less backend CPU,
-- and a commit after an idle spell answers 0.1-0.35 ms sooner (docs/decisions.md 27). The
-- statement calls this when a stream is no longer as the batch expected it; the error rolls
-- the whole statement back.
CREATE FUNCTION ds_stream_moved() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stream moved' USING ERRCODE = 'EA001';
END
$$;

DROP FUNCTION ds_append_batch(
    bigint[], bigint[], boolean[], bigint[], boolean[], text[], bigint[], bigint[], text[],
    bigint[], bigint[], bytea[], bigint[], text[], bigint[], bigint[], text, text[]
);
