-- Claim write tokens (spec/02 §4.8, spec/03 §5.13): the secret a claimed wake's handler presents
-- on entity stream appends and tag writes. The reference keeps them in process memory, so a
-- second server process or a restart refuses a live handler's writes; here they are rows.
-- At most one live token per entity: a newer claim replaces the older one, and revoking a
-- token deletes its row (nothing else needs the history).
CREATE TABLE claim_write_tokens (
    tenant_id   text NOT NULL DEFAULT 'default',
    entity_url  text NOT NULL,
    token_hash  bytea NOT NULL,          -- sha256 of the token; the token is never stored
    wake_id     text NOT NULL,           -- the claim (consumer) the token was minted for
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,             -- NULL: valid until revoked
    PRIMARY KEY (tenant_id, entity_url)
);
CREATE INDEX idx_claim_write_tokens_wake ON claim_write_tokens (tenant_id, wake_id);
