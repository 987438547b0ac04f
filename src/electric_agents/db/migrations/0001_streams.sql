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
