-- Live newsletter schema. Re-runnable: app.py applies it at every start, in one transaction.
-- Needs PostgreSQL 14 or newer (CREATE OR REPLACE TRIGGER).

-- Processes that start together take turns (concurrent CREATE ... IF NOT EXISTS can collide);
-- the lock is held until the applying transaction commits.
SELECT pg_advisory_xact_lock(hashtext('newsletters_schema'));

CREATE TABLE IF NOT EXISTS newsletters (
    id          bigserial   PRIMARY KEY,
    title       text        NOT NULL,
    content     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint      NOT NULL UNIQUE,        -- position in the change stream; the unique index serves "version > N"
    deleted     boolean     NOT NULL DEFAULT false, -- a tombstone: kept so clients that were away learn of the delete
    -- The rules live here, so a psql write is held to them like an API write.
    -- Each constraint's name is the message the API sends back when it fails.
    CONSTRAINT "title must be 1 to 200 characters"
        CHECK (deleted OR char_length(btrim(title, E' \t\r\n')) BETWEEN 1 AND 200),
    CONSTRAINT "content must not be empty"
        CHECK (deleted OR btrim(content, E' \t\r\n') <> ''),
    CONSTRAINT "content must be at most 1 MiB"
        CHECK (octet_length(content) <= 1048576)
);

-- Upgrade: a table made before the title rule ignored tabs and line breaks as the content rule
-- does gets the new rule (NOT VALID: rows already written are not checked again).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint
                   WHERE conrelid = 'newsletters'::regclass
                     AND conname = 'title must be 1 to 200 characters'
                     AND position(E'\t' IN pg_get_constraintdef(oid)) > 0) THEN
        ALTER TABLE newsletters DROP CONSTRAINT IF EXISTS "title must be 1 to 200 characters";
        ALTER TABLE newsletters ADD CONSTRAINT "title must be 1 to 200 characters"
            CHECK (deleted OR char_length(btrim(title, E' \t\r\n')) BETWEEN 1 AND 200) NOT VALID;
    END IF;
END $$;

-- Each row as the JSON that the app sends, written by PostgreSQL: the app
-- frames this text without parsing it, so any value the table accepts (a
-- date in the year 12000, 'infinity') reaches every browser. A tombstone
-- says only which row went, and when in the stream.
CREATE OR REPLACE FUNCTION newsletter_json(n newsletters) RETURNS text AS $$
    SELECT CASE
        WHEN n.deleted THEN json_build_object('id', n.id, 'version', n.version, 'deleted', true)
        ELSE json_build_object('id', n.id, 'title', n.title, 'content', n.content,
                               'created_at', n.created_at, 'updated_at', n.updated_at,
                               'version', n.version, 'deleted', false)
    END::text
$$ LANGUAGE sql STABLE;

CREATE SEQUENCE IF NOT EXISTS newsletters_version;

-- Every insert and update draws a new version. A sequence alone hands out
-- numbers in the order transactions *ask*, not the order they *commit*: a
-- reader could see version 8 while 7 is still uncommitted, move its cursor
-- past 7 and never send it. So each writing transaction first takes one
-- transaction-scoped advisory lock, held until it commits; versions are then
-- drawn and made visible one transaction after the other. PostgreSQL already
-- serialises the commits of transactions that NOTIFY, so this costs little.
-- The price: a writer that keeps its transaction open makes the others wait.
CREATE OR REPLACE FUNCTION newsletters_stamp() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('newsletters_version'));
    NEW.version := nextval('newsletters_version');
    NEW.updated_at := now();
    IF TG_OP = 'UPDATE' THEN
        NEW.created_at := OLD.created_at;
    END IF;
    IF NEW.deleted THEN  -- a tombstone keeps its id and version, not the text
        NEW.title := '';
        NEW.content := '';
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER newsletters_stamp
    BEFORE INSERT OR UPDATE ON newsletters
    FOR EACH ROW EXECUTE FUNCTION newsletters_stamp();

-- A DELETE, from the API or from psql, becomes an update to a tombstone, so
-- it gets a version like any other change. (psql reports "DELETE 0" because
-- the row itself stays.)
CREATE OR REPLACE FUNCTION newsletters_tombstone() RETURNS trigger AS $$
BEGIN
    UPDATE newsletters SET deleted = true WHERE id = OLD.id AND NOT deleted;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER newsletters_tombstone
    BEFORE DELETE ON newsletters
    FOR EACH ROW EXECUTE FUNCTION newsletters_tombstone();

-- The doorbell: one payload-free NOTIFY per statement. Listeners read what
-- changed from the table, so the 8000-byte payload limit never matters, and
-- PostgreSQL folds repeated notifications within a transaction into one.
-- NOTIFY is sent at commit, so a rolled-back transaction rings nothing.
CREATE OR REPLACE FUNCTION newsletters_notify() RETURNS trigger AS $$
BEGIN
    NOTIFY newsletters;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER newsletters_notify
    AFTER INSERT OR UPDATE OR DELETE ON newsletters
    FOR EACH STATEMENT EXECUTE FUNCTION newsletters_notify();
