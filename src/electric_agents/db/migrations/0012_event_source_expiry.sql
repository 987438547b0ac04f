-- Event-source subscriptions with an `expires_at` lifetime (spec/03 §5.9) end at that time:
-- a scheduled task of a new kind removes the subscription's wake registration and writes
-- its manifest delete (the reference only recorded the lifetime).
ALTER TABLE scheduled_tasks DROP CONSTRAINT chk_scheduled_tasks_kind;
ALTER TABLE scheduled_tasks ADD CONSTRAINT chk_scheduled_tasks_kind
    CHECK (kind IN ('delayed_send', 'cron_tick', 'event_source_expiry'));
CREATE INDEX idx_scheduled_tasks_expiry_pending
    ON scheduled_tasks (tenant_id, owner_entity_url, manifest_key)
    WHERE kind = 'event_source_expiry' AND completed_at IS NULL;
