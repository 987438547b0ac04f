-- The tag outbox drains each entity's rows strictly in id order (spec/03 §5.5; the reference
-- could reorder them across drainers and retries). A failed row waits `next_attempt_at`
-- (exponential backoff) and holds back the rows behind it; the row lock taken while it is
-- drained is the claim, so `claimed_by`/`claimed_at` stay unused.
ALTER TABLE tag_stream_outbox
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now();

-- The drainer's question: which entities' oldest live row is due?
CREATE INDEX idx_tag_stream_outbox_live
    ON tag_stream_outbox (tenant_id, entity_url, id)
    WHERE dead_lettered_at IS NULL;
