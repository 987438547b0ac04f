-- The `__ds` subscription API (spec/01 §A.19): subscriptions, their stream links, and the one
-- outstanding wake each subscription may have. Pending work is never stored: a link is
-- pending while its stream's tail is past its acknowledged offset, so a crash cannot lose it.
-- The wake columns double as the delivery outbox (state + next_attempt_at + delivery lease).

CREATE TABLE ds_subscriptions (
    id                    text PRIMARY KEY,
    type                  text NOT NULL CHECK (type IN ('webhook', 'pull-wake')),
    pattern               text,
    webhook_url           text,
    wake_stream           text,
    lease_ttl_ms          integer NOT NULL,
    description           text,
    config_hash           text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    status                text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'failed')),
    -- Goes up by one for every wake; callbacks and acks carry it as a fence.
    generation            bigint NOT NULL DEFAULT 0,

    -- The outstanding wake, all NULL when there is none. It names exactly one stream.
    -- wake_state: webhook 'delivering' -> 'delivered';
    --             pull-wake 'notifying' -> 'waiting' -> 'claimed'.
    wake_id               text,
    wake_state            text CHECK (
        wake_state IN ('delivering', 'delivered', 'notifying', 'waiting', 'claimed')),
    wake_path             text,
    wake_link_type        text,
    wake_acked_offset     bigint,
    wake_tail_offset      bigint,
    wake_holder           text,
    lease_expires_at      timestamptz,

    -- Delivery outbox: when the next attempt is due, and which process is attempting it.
    next_attempt_at       timestamptz,
    attempts              integer NOT NULL DEFAULT 0,
    delivery_owner        bigint,
    delivery_lease_until  timestamptz,
    last_error            text,

    CHECK ((wake_id IS NULL) = (wake_state IS NULL))
);

CREATE INDEX ds_subscriptions_due_idx ON ds_subscriptions (next_attempt_at)
    WHERE wake_state IN ('delivering', 'notifying');
CREATE INDEX ds_subscriptions_lease_idx ON ds_subscriptions (lease_expires_at)
    WHERE wake_state IN ('delivered', 'claimed');
CREATE INDEX ds_subscriptions_pattern_idx ON ds_subscriptions (id) WHERE pattern IS NOT NULL;

CREATE TABLE ds_subscription_links (
    subscription_id        text NOT NULL REFERENCES ds_subscriptions (id) ON DELETE CASCADE,
    path                   text NOT NULL,
    explicit               boolean NOT NULL DEFAULT false,
    glob                   boolean NOT NULL DEFAULT false,
    -- Byte position acknowledged so far; -1 means "before the first message".
    acked_offset           bigint NOT NULL,
    -- The generation of the last wake that named this stream: the stream named longest ago
    -- is named next, so a busy stream cannot starve the others.
    last_named_generation  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subscription_id, path),
    CHECK (explicit OR glob)
);

CREATE INDEX ds_subscription_links_path_idx ON ds_subscription_links (path);
