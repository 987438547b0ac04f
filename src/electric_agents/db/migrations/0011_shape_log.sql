-- The change log behind the shape API (`/_electric/electric/v1/shape`, spec/02 §3.2).
--
-- A trigger records every row change of the four listed tables in the same transaction as
-- the change, with the writer's txid (the value spawn and signal return). `seq` orders the
-- changes of one transaction and the changes of one row, but bigserial values are taken
-- before commit, so they are NOT commit ordered across transactions. A reader could skip a
-- change with a smaller seq that commits later. So a sequencer (any process, one at a time:
-- it locks the `shape_log_head` row) stamps `position` onto committed changes in seq order.
-- Positions are assigned only to committed rows by a serialized writer, so once a reader
-- sees position P, every change with a smaller position is committed and visible too.
CREATE TABLE shape_changes (
    seq         bigserial PRIMARY KEY,
    position    bigint UNIQUE,
    txid        bigint NOT NULL DEFAULT (pg_current_xact_id()::xid::text::bigint),
    tenant_id   text NOT NULL,
    table_name  text NOT NULL,
    operation   text NOT NULL CHECK (operation IN ('insert', 'update', 'delete')),
    new_row     jsonb,
    old_row     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_shape_changes_unsequenced ON shape_changes (seq) WHERE position IS NULL;
CREATE INDEX idx_shape_changes_read ON shape_changes (tenant_id, table_name, position);

-- One row: the last position handed out, and everything at or below `purged_through` has
-- been deleted (clients behind it must refetch). `log_id` changes only with a new database,
-- so handles from another database never validate here.
CREATE TABLE shape_log_head (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position        bigint NOT NULL DEFAULT 0,
    purged_through  bigint NOT NULL DEFAULT 0,
    log_id          text NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text)
);
INSERT INTO shape_log_head DEFAULT VALUES;

CREATE FUNCTION record_shape_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO shape_changes (tenant_id, table_name, operation, new_row)
        VALUES (NEW.tenant_id, TG_TABLE_NAME, 'insert', to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO shape_changes (tenant_id, table_name, operation, new_row, old_row)
        VALUES (NEW.tenant_id, TG_TABLE_NAME, 'update', to_jsonb(NEW), to_jsonb(OLD));
    ELSE
        INSERT INTO shape_changes (tenant_id, table_name, operation, old_row)
        VALUES (OLD.tenant_id, TG_TABLE_NAME, 'delete', to_jsonb(OLD));
    END IF;
    -- Delivered at commit (once per transaction and payload): wakes the sequencers.
    PERFORM pg_notify('shape_changes', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_entities_shape_log AFTER INSERT OR UPDATE OR DELETE ON entities
FOR EACH ROW EXECUTE FUNCTION record_shape_change();
CREATE TRIGGER trg_entity_types_shape_log AFTER INSERT OR UPDATE OR DELETE ON entity_types
FOR EACH ROW EXECUTE FUNCTION record_shape_change();
CREATE TRIGGER trg_runners_shape_log AFTER INSERT OR UPDATE OR DELETE ON runners
FOR EACH ROW EXECUTE FUNCTION record_shape_change();
CREATE TRIGGER trg_runner_diagnostics_shape_log
AFTER INSERT OR UPDATE OR DELETE ON runner_runtime_diagnostics
FOR EACH ROW EXECUTE FUNCTION record_shape_change();
