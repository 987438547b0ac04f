-- Entity membership streams (`/_entities/<sourceRef>`, spec/03 §5.10) without Electric.
--
-- Every committed change of an `entities` row queues the entity's URL here, in the same
-- transaction, while any bridge exists for the tenant; a drainer turns queued URLs into
-- `members` events. The advisory lock closes the race with a bridge being created: a new
-- bridge takes it exclusively, so an entity change either committed before the bridge (and
-- the bridge's first reconciliation sees it) or sees the bridge and queues its URL.
CREATE TABLE entity_membership_outbox (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL,
    entity_url  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- What each bridge stream says right now: the last `members` row written per entity, so
-- a change is diffed against it instead of replaying the stream. Kept when a bridge row is
-- garbage-collected (the stream stays too), so a re-registered bridge continues from it.
CREATE TABLE entity_bridge_members (
    tenant_id   text NOT NULL,
    source_ref  text NOT NULL,
    entity_url  text NOT NULL,
    member      jsonb NOT NULL,
    PRIMARY KEY (tenant_id, source_ref, entity_url)
);
CREATE INDEX idx_entity_bridge_members_url ON entity_bridge_members (tenant_id, entity_url);

CREATE FUNCTION queue_entity_membership_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    -- Shared: entity changes never wait for each other, only for a bridge being created.
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('entity-bridges:' || changed.tenant_id, 0));
    IF EXISTS (SELECT 1 FROM entity_bridges WHERE tenant_id = changed.tenant_id) THEN
        INSERT INTO entity_membership_outbox (tenant_id, entity_url)
        VALUES (changed.tenant_id, changed.url);
        PERFORM pg_notify('entity_membership_outbox', changed.tenant_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_entities_membership
AFTER INSERT OR UPDATE OR DELETE ON entities
FOR EACH ROW EXECUTE FUNCTION queue_entity_membership_change();
