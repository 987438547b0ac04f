-- The agents registry (spec/03 §1.2). Column names and types match the reference server's
-- tables after its migration 0009, because clients read these rows through the shape API.
-- Every table is scoped by tenant_id, which leads every key.

CREATE TABLE entity_types (
    tenant_id               text NOT NULL DEFAULT 'default',
    name                    text NOT NULL,
    description             text NOT NULL,
    creation_schema         jsonb,
    inbox_schemas           jsonb,
    state_schemas           jsonb,
    serve_endpoint          text,
    default_dispatch_policy jsonb,
    revision                integer NOT NULL DEFAULT 1,
    created_at              text NOT NULL,   -- ISO-8601, as the reference stores it
    updated_at              text NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE entities (
    tenant_id        text NOT NULL DEFAULT 'default',
    url              text NOT NULL,
    type             text NOT NULL,
    status           text NOT NULL DEFAULT 'idle',
    subscription_id  text NOT NULL,
    dispatch_policy  jsonb,
    write_token      text NOT NULL,
    tags             jsonb NOT NULL DEFAULT '{}',
    tags_index       text[] NOT NULL DEFAULT '{}',
    spawn_args       jsonb DEFAULT '{}',
    parent           text,
    created_by       text,
    type_revision    integer,
    inbox_schemas    jsonb,
    state_schemas    jsonb,
    created_at       bigint NOT NULL,        -- epoch milliseconds
    updated_at       bigint NOT NULL,
    PRIMARY KEY (tenant_id, url),
    CONSTRAINT chk_entities_status CHECK (
        status IN ('spawning', 'running', 'idle', 'paused', 'stopping', 'stopped', 'killed')
    )
);
CREATE INDEX idx_entities_type ON entities (tenant_id, type);
CREATE INDEX idx_entities_status ON entities (tenant_id, status);
CREATE INDEX idx_entities_parent ON entities (tenant_id, parent);
CREATE INDEX idx_entities_created_by ON entities (tenant_id, created_by);
CREATE INDEX entities_tags_index_gin ON entities USING gin (tags_index);

CREATE TABLE entity_dispatch_state (
    tenant_id                   text NOT NULL DEFAULT 'default',
    entity_url                  text NOT NULL,
    pending_source_streams      jsonb NOT NULL DEFAULT '[]',
    pending_reason              text,
    pending_since               timestamptz,
    outstanding_wake_id         text,
    outstanding_wake_target     jsonb,
    outstanding_wake_created_at timestamptz,
    active_consumer_id          text,
    active_runner_id            text,
    active_epoch                integer,
    active_claimed_at           timestamptz,
    active_lease_expires_at     timestamptz,
    last_wake_id                text,
    last_claimed_at             timestamptz,
    last_released_at            timestamptz,
    last_completed_at           timestamptz,
    last_error                  text,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, entity_url)
);
CREATE INDEX idx_entity_dispatch_state_active_runner
    ON entity_dispatch_state (tenant_id, active_runner_id);
CREATE INDEX idx_entity_dispatch_state_outstanding_wake
    ON entity_dispatch_state (tenant_id, outstanding_wake_id);
CREATE INDEX idx_entity_dispatch_state_active_lease
    ON entity_dispatch_state (tenant_id, active_lease_expires_at);

CREATE TABLE wake_registrations (
    id                serial PRIMARY KEY,
    tenant_id         text NOT NULL DEFAULT 'default',
    subscriber_url    text NOT NULL,
    source_url        text NOT NULL,
    condition         jsonb NOT NULL,
    debounce_ms       integer NOT NULL DEFAULT 0,
    timeout_ms        integer NOT NULL DEFAULT 0,
    one_shot          boolean NOT NULL DEFAULT false,
    timeout_consumed  boolean NOT NULL DEFAULT false,
    include_response  boolean NOT NULL DEFAULT true,
    manifest_key      text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_wake_registration UNIQUE (
        tenant_id, subscriber_url, source_url, one_shot, debounce_ms, timeout_ms, condition,
        manifest_key
    )
);
CREATE INDEX idx_wake_source_url ON wake_registrations (tenant_id, source_url);
-- At most one registration per (subscriber, manifest key): the spawn-time wake and the
-- manifest entry must never both fire (the reference's 0.4.8 duplicate-wake bug).
CREATE UNIQUE INDEX uq_wake_registration_manifest_key
    ON wake_registrations (tenant_id, subscriber_url, manifest_key)
    WHERE manifest_key IS NOT NULL;

CREATE TABLE scheduled_tasks (
    id                bigserial PRIMARY KEY,
    tenant_id         text NOT NULL DEFAULT 'default',
    kind              text NOT NULL,
    payload           jsonb NOT NULL,
    fire_at           timestamptz NOT NULL,
    cron_expression   text,
    cron_timezone     text,
    cron_tick_number  integer,
    owner_entity_url  text,
    manifest_key      text,
    claimed_by        text,
    claimed_at        timestamptz,
    completed_at      timestamptz,
    last_error        text,
    attempt_count     integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chk_scheduled_tasks_kind CHECK (kind IN ('delayed_send', 'cron_tick')),
    CONSTRAINT uq_cron_tick UNIQUE (tenant_id, cron_expression, cron_timezone, cron_tick_number)
);
CREATE INDEX idx_scheduled_tasks_fire_ready ON scheduled_tasks (tenant_id, fire_at)
    WHERE completed_at IS NULL AND claimed_at IS NULL;
CREATE INDEX idx_scheduled_tasks_manifest_pending
    ON scheduled_tasks (tenant_id, owner_entity_url, manifest_key)
    WHERE kind = 'delayed_send' AND completed_at IS NULL AND manifest_key IS NOT NULL;
CREATE INDEX idx_scheduled_tasks_stale_claims ON scheduled_tasks (tenant_id, claimed_at)
    WHERE completed_at IS NULL AND claimed_at IS NOT NULL;

CREATE TABLE subscription_webhooks (
    tenant_id        text NOT NULL DEFAULT 'default',
    subscription_id  text NOT NULL,
    webhook_url      text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, subscription_id)
);

CREATE TABLE consumer_callbacks (
    tenant_id       text NOT NULL DEFAULT 'default',
    consumer_id     text NOT NULL,
    callback_url    text NOT NULL,
    primary_stream  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, consumer_id)
);
CREATE INDEX idx_consumer_callbacks_primary_stream ON consumer_callbacks (tenant_id, primary_stream);

CREATE TABLE consumer_claims (
    tenant_id          text NOT NULL DEFAULT 'default',
    consumer_id        text NOT NULL,
    epoch              integer NOT NULL,
    wake_id            text,
    entity_url         text NOT NULL,
    stream_path        text NOT NULL,
    runner_id          text,
    status             text NOT NULL DEFAULT 'active',
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz,
    lease_expires_at   timestamptz,
    released_at        timestamptz,
    acked_streams      jsonb,
    updated_at         timestamptz,
    PRIMARY KEY (tenant_id, consumer_id, epoch),
    CONSTRAINT chk_consumer_claims_status
        CHECK (status IN ('active', 'released', 'expired', 'failed'))
);
CREATE INDEX idx_consumer_claims_entity_status ON consumer_claims (tenant_id, entity_url, status);
CREATE INDEX idx_consumer_claims_runner ON consumer_claims (tenant_id, runner_id);
CREATE INDEX idx_consumer_claims_wake_id ON consumer_claims (tenant_id, wake_id);
CREATE INDEX idx_consumer_claims_lease_expires_at ON consumer_claims (tenant_id, lease_expires_at);

CREATE TABLE runners (
    tenant_id        text NOT NULL DEFAULT 'default',
    id               text NOT NULL,
    owner_principal  text NOT NULL,
    label            text NOT NULL,
    kind             text NOT NULL DEFAULT 'local',
    admin_status     text NOT NULL DEFAULT 'enabled',
    wake_stream      text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT uq_runners_wake_stream UNIQUE (tenant_id, wake_stream),
    CONSTRAINT chk_runners_kind CHECK (kind IN ('local', 'cloud-worker', 'sandbox', 'ci', 'server')),
    CONSTRAINT chk_runners_admin_status CHECK (admin_status IN ('enabled', 'disabled'))
);
CREATE INDEX idx_runners_owner_principal ON runners (tenant_id, owner_principal);
CREATE INDEX idx_runners_admin_status ON runners (tenant_id, admin_status);

CREATE TABLE runner_runtime_diagnostics (
    tenant_id                  text NOT NULL DEFAULT 'default',
    runner_id                  text NOT NULL,
    owner_principal            text NOT NULL,
    wake_stream_offset         text,
    last_seen_at               timestamptz NOT NULL,
    liveness_lease_expires_at  timestamptz NOT NULL,
    diagnostics                jsonb,
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, runner_id)
);
CREATE INDEX idx_runner_runtime_diagnostics_owner
    ON runner_runtime_diagnostics (tenant_id, owner_principal);
CREATE INDEX idx_runner_runtime_diagnostics_liveness
    ON runner_runtime_diagnostics (tenant_id, liveness_lease_expires_at);

CREATE TABLE entity_bridges (
    tenant_id                  text NOT NULL DEFAULT 'default',
    source_ref                 text NOT NULL,
    tags                       jsonb NOT NULL,
    stream_url                 text NOT NULL,
    shape_handle               text,
    shape_offset               text,
    last_observer_activity_at  timestamptz NOT NULL DEFAULT now(),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source_ref),
    CONSTRAINT uq_entity_bridges_stream_url UNIQUE (tenant_id, stream_url)
);

CREATE TABLE entity_manifest_sources (
    tenant_id         text NOT NULL DEFAULT 'default',
    owner_entity_url  text NOT NULL,
    manifest_key      text NOT NULL,
    source_ref        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_entity_manifest_source UNIQUE (tenant_id, owner_entity_url, manifest_key)
);
CREATE INDEX idx_entity_manifest_sources_source_ref
    ON entity_manifest_sources (tenant_id, source_ref);

CREATE TABLE tag_stream_outbox (
    id                bigserial PRIMARY KEY,
    tenant_id         text NOT NULL DEFAULT 'default',
    entity_url        text NOT NULL,
    collection        text NOT NULL,
    op                text NOT NULL,
    key               text NOT NULL,
    row_data          jsonb,
    attempt_count     integer NOT NULL DEFAULT 0,
    last_error        text,
    claimed_by        text,
    claimed_at        timestamptz,
    dead_lettered_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_tag_stream_outbox_unclaimed ON tag_stream_outbox (tenant_id, created_at)
    WHERE claimed_at IS NULL AND dead_lettered_at IS NULL;
CREATE INDEX idx_tag_stream_outbox_stale_claims ON tag_stream_outbox (tenant_id, claimed_at)
    WHERE claimed_at IS NOT NULL AND dead_lettered_at IS NULL;
CREATE INDEX idx_tag_stream_outbox_entity ON tag_stream_outbox (tenant_id, entity_url, id);

CREATE TABLE users (
    tenant_id      text NOT NULL DEFAULT 'default',
    id             text NOT NULL,
    display_name   text,
    email          text,
    avatar_url     text,
    auth_provider  text,
    auth_subject   text,
    profile        jsonb NOT NULL DEFAULT '{}',
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX idx_users_email ON users (tenant_id, email);
CREATE INDEX idx_users_auth_identity ON users (tenant_id, auth_provider, auth_subject);

CREATE TABLE wake_notifications (
    tenant_id                  text NOT NULL DEFAULT 'default',
    wake_id                    text NOT NULL,
    entity_url                 text NOT NULL,
    target_type                text NOT NULL,
    target_runner_id           text,
    target_webhook_url         text,
    target_worker_pool_id      text,
    runner_wake_stream         text,
    runner_wake_stream_offset  text,
    notification_public        jsonb NOT NULL,
    delivery_status            text NOT NULL DEFAULT 'queued',
    claim_status               text NOT NULL DEFAULT 'unclaimed',
    created_at                 timestamptz NOT NULL DEFAULT now(),
    delivered_at               timestamptz,
    claimed_at                 timestamptz,
    resolved_at                timestamptz,
    PRIMARY KEY (tenant_id, wake_id),
    CONSTRAINT chk_wake_notifications_target CHECK (target_type IN ('webhook', 'runner', 'worker-pool')),
    CONSTRAINT chk_wake_notifications_delivery
        CHECK (delivery_status IN ('queued', 'delivered', 'failed', 'superseded')),
    CONSTRAINT chk_wake_notifications_claim
        CHECK (claim_status IN ('unclaimed', 'claimed', 'completed', 'expired'))
);
CREATE INDEX idx_wake_notifications_entity ON wake_notifications (tenant_id, entity_url);
CREATE INDEX idx_wake_notifications_runner ON wake_notifications (tenant_id, target_runner_id);
CREATE INDEX idx_wake_notifications_delivery ON wake_notifications (tenant_id, delivery_status);
CREATE INDEX idx_wake_notifications_claim ON wake_notifications (tenant_id, claim_status);
CREATE INDEX idx_wake_notifications_created ON wake_notifications (tenant_id, created_at);
