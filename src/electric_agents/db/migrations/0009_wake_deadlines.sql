-- Wake registrations without duplicates, and durable wake deadlines (spec/03 §4.1, §4.6,
-- §4.7). The reference keeps debounce buffers and timeout timers in process memory, so a
-- restart loses a pending debounced wake; here both are rows a worker claims with
-- FOR UPDATE SKIP LOCKED.

-- NULL manifest keys no longer make identical registrations distinct (the reference
-- duplicated them, and each duplicate woke the subscriber again).
ALTER TABLE wake_registrations DROP CONSTRAINT uq_wake_registration;
ALTER TABLE wake_registrations ADD CONSTRAINT uq_wake_registration UNIQUE NULLS NOT DISTINCT (
    tenant_id, subscriber_url, source_url, one_shot, debounce_ms, timeout_ms, condition,
    manifest_key
);

-- Timeouts still to fire: the worker scans only these.
CREATE INDEX idx_wake_registrations_pending_timeout ON wake_registrations (tenant_id, created_at)
    WHERE timeout_ms > 0 AND NOT timeout_consumed;

-- A debounced registration's buffered changes, delivered as one wake at fire_at (trailing
-- edge: every match pushes fire_at out again). Removed with its registration.
CREATE TABLE wake_debounce_buffers (
    registration_id      integer PRIMARY KEY REFERENCES wake_registrations (id) ON DELETE CASCADE,
    tenant_id            text NOT NULL DEFAULT 'default',
    changes              jsonb NOT NULL,
    run_finished_status  text,
    fire_at              timestamptz NOT NULL
);
CREATE INDEX idx_wake_debounce_buffers_fire_at ON wake_debounce_buffers (tenant_id, fire_at);
