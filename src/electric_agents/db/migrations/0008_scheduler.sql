-- Scheduler (spec/03 §5.7): transient failures retry after a backoff instead of at once
-- (the reference re-claimed a failed task in a tight loop), and every insert wakes the
-- schedulers of all processes on the same database.
ALTER TABLE scheduled_tasks ADD COLUMN retry_at timestamptz;

CREATE FUNCTION scheduled_tasks_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('scheduled_tasks_wake', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER scheduled_tasks_notify
    AFTER INSERT ON scheduled_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION scheduled_tasks_notify();
