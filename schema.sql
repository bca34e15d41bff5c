-- Live tables schema. Re-runnable: app.py applies it at every start, in one transaction.
-- Needs PostgreSQL 14 or newer (CREATE OR REPLACE TRIGGER).
--
-- Two parts. The machinery makes any table live: versions in commit order, tombstones, the
-- doorbell. It is the same for every table and every copy of this project: change nothing there.
-- Then "your table": the newsletters table, its JSON, and the line that makes it live. A copy
-- replaces that part (README: "Make your own table live").

-- ==== the machinery: the same for every live table ============================================

-- The functions below keep the names they were made with (SET search_path FROM CURRENT): this
-- schema, then pg_temp, so that no caller can slip in a table or function of the same name.
DO $$
BEGIN
    PERFORM set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);
END $$;

-- The version clock: one sequence and one lock for every live table. Its table holds one row,
-- which each writing transaction locks (live_stamp). PUBLIC gets no rights on either, so no
-- other role can take the lock: an advisory lock would be open to every role, and any session
-- holding it would stop every write.
DO $$
BEGIN
    IF to_regclass('live_clock') IS NULL THEN
        CREATE TABLE live_clock (one boolean PRIMARY KEY DEFAULT true CHECK (one));
        CREATE SEQUENCE live_version;
        REVOKE ALL ON TABLE live_clock FROM PUBLIC;
        REVOKE ALL ON SEQUENCE live_version FROM PUBLIC;
    END IF;
EXCEPTION WHEN unique_violation THEN
    -- Another process made them at the same moment: they exist now.
END $$;

-- Processes that start together take turns (concurrent CREATE ... IF NOT EXISTS can collide).
-- Only the clock table's owner may take this lock, and it is held until the applying
-- transaction commits. Writers are not held up: they only lock the clock's row.
LOCK TABLE live_clock IN SHARE UPDATE EXCLUSIVE MODE;
INSERT INTO live_clock VALUES (true) ON CONFLICT DO NOTHING;

-- The horizon: the newest version that is gone from the tables for good, and why (tombstones
-- purged, a table truncated, the database restored). A browser whose cursor is below it missed a
-- change that can no longer be read, so its stream starts over (app.py: "reset"). It only moves
-- forward, and it is kept here rather than worked out from the oldest row left: the oldest row
-- cannot witness the tombstones purged above it. One row, owned like live_clock: PUBLIC gets no
-- rights on it, and only the triggers below (SECURITY DEFINER) write it.
DO $$
BEGIN
    IF to_regclass('live_horizon') IS NULL THEN
        CREATE TABLE live_horizon (
            one     boolean PRIMARY KEY DEFAULT true CHECK (one),
            version bigint  NOT NULL DEFAULT 0,
            reason  text    NOT NULL DEFAULT ''
        );
        REVOKE ALL ON TABLE live_horizon FROM PUBLIC;
    END IF;
END $$;
INSERT INTO live_horizon VALUES (true) ON CONFLICT DO NOTHING;

-- Every insert and update draws a new version. A sequence alone hands out numbers in the order
-- transactions *ask*, not the order they *commit*: a reader could see version 8 while 7 is still
-- uncommitted, move its cursor past 7 and never send it. So each writing transaction first locks
-- the clock's row, held until it commits; versions are then drawn and made visible one
-- transaction after the other. PostgreSQL already serialises the commits of transactions that
-- NOTIFY, so this costs little. The price: a writer that keeps its transaction open makes the
-- others wait. It runs with its owner's rights (SECURITY DEFINER), so that whoever may write to
-- a live table may lock the clock, and nobody else. It sets only the columns the machinery owns,
-- and on a tombstone empties the text columns the trigger names (see make_live).
CREATE OR REPLACE FUNCTION live_stamp() RETURNS trigger
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM FROM live_clock FOR UPDATE;
    NEW.version := nextval('live_version');
    NEW.updated_at := now();
    IF TG_OP = 'UPDATE' THEN
        NEW.created_at := OLD.created_at;
    END IF;
    IF NEW.deleted AND TG_NARGS > 0 THEN  -- a tombstone keeps its id and version, not the text
        NEW := jsonb_populate_record(NEW, (SELECT jsonb_object_agg(name, '')
                                           FROM unnest(TG_ARGV) AS name));
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;

-- A DELETE, from the API or from psql, becomes an update to a tombstone, so it gets a version
-- like any other change. (psql reports "DELETE 0" because the row itself stays.) A DELETE of a
-- row that is already a tombstone removes it for good: that is how tombstones are purged, e.g.
--   DELETE FROM newsletters WHERE deleted AND updated_at < now() - interval '30 days';
CREATE OR REPLACE FUNCTION live_tombstone() RETURNS trigger AS $$
BEGIN
    IF OLD.deleted THEN
        RETURN OLD;
    END IF;
    EXECUTE format('UPDATE %I.%I SET deleted = true WHERE id = $1 AND NOT deleted',
                   TG_TABLE_SCHEMA, TG_TABLE_NAME) USING OLD.id;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Purged tombstones move the horizon up to the newest of them: a browser away since before it
-- can never learn of that delete, so it starts over. Streams already past it lose nothing. One
-- update per statement, from the rows it removed (only tombstones get that far).
CREATE OR REPLACE FUNCTION live_purged() RETURNS trigger
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE live_horizon SET version = gone.version, reason = 'deletions it missed were purged'
    FROM (SELECT max(version) AS version FROM purged) AS gone
    WHERE gone.version > live_horizon.version;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- TRUNCATE removes rows without a trigger for each, so without tombstones. It moves the horizon
-- to a version of its own, drawn after every row's (under the clock's lock, as live_stamp draws
-- one): every stream open now, and every cursor handed out before, is below it and starts over.
CREATE OR REPLACE FUNCTION live_truncated() RETURNS trigger
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM FROM live_clock FOR UPDATE;
    UPDATE live_horizon SET version = nextval('live_version'),
                            reason = format('the table %s was truncated', TG_TABLE_NAME);
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Where the change stream stands, which the listener reads with every read of the changes (one
-- statement, one snapshot): the newest version drawn from the clock (below what the listener has
-- seen: the clock went back), and the horizon (above it: every stream starts over).
CREATE OR REPLACE FUNCTION live_position(OUT drawn bigint, OUT horizon bigint, OUT reason text)
STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM live_version),
           version, reason
    FROM live_horizon
$$ LANGUAGE sql;

-- The version clock went back: a restored dump, ALTER SEQUENCE live_version RESTART, a new
-- database at the same address. It is then behind a version a listener has already sent (seen),
-- or behind the horizon. Cursors handed out before would name changes of another history, and
-- new writes would hide below versions the listeners have passed. The listener that notices
-- calls this: the clock moves on past both, and the horizon with it, so that versions still only
-- go forward and every stream and cursor from before starts over. Only the owner may call it.
CREATE OR REPLACE FUNCTION live_restored(seen bigint) RETURNS void
SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    passed bigint;
BEGIN
    PERFORM FROM live_clock FOR UPDATE;
    SELECT greatest(seen, horizon) INTO passed FROM live_position();
    -- Another listener (another process of the app) may have moved it on meanwhile.
    IF (SELECT drawn FROM live_position()) < passed THEN
        PERFORM setval('live_version', passed + 1);
        UPDATE live_horizon SET version = passed + 1,
                                reason = 'the database was replaced or restored';
    END IF;
END $$ LANGUAGE plpgsql;
REVOKE ALL ON FUNCTION live_restored(bigint) FROM PUBLIC;

-- The app's own purge of old tombstones (app.py's KEEP_TOMBSTONES): of each live table's
-- tombstones older than kept, a batch at most; returns how many went. Rows another session has
-- locked are skipped, so the purge never waits (two processes of the app may purge at once), and
-- a table with nothing to purge gets no DELETE, which would ring the doorbell all the same.
CREATE OR REPLACE FUNCTION live_purge(kept interval, batch integer) RETURNS bigint
SET search_path FROM CURRENT AS $$
DECLARE
    live_table regclass;
    old bigint[];
    purged bigint;
    total bigint := 0;
BEGIN
    FOR live_table IN SELECT tgrelid FROM pg_trigger
                      WHERE tgfoid = 'live_tombstone()'::regprocedure LOOP
        EXECUTE format('SELECT array_agg(id) FROM (SELECT id FROM %s WHERE deleted'
                       ' AND updated_at < now() - $1 LIMIT $2 FOR UPDATE SKIP LOCKED) AS old',
                       live_table) INTO old USING kept, batch;
        IF old IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s WHERE id = ANY($1)', live_table) USING old;
            GET DIAGNOSTICS purged = ROW_COUNT;
            total := total + purged;
        END IF;
    END LOOP;
    RETURN total;
END $$ LANGUAGE plpgsql;


-- The doorbell: one payload-free NOTIFY per statement, on one channel for every live table.
-- Listeners read what changed from the tables, so the 8000-byte payload limit never matters, and
-- PostgreSQL folds repeated notifications within a transaction into one. NOTIFY is sent at
-- commit, so a rolled-back transaction rings nothing. If the notification queue is half full
-- (a session that LISTENs and never reads fills it, and a full queue fails every notifying
-- commit), the bell stays silent and says so: the listeners read every CHECK_EVERY seconds
-- anyway, so the change arrives late but the write never fails.
CREATE OR REPLACE FUNCTION live_notify() RETURNS trigger AS $$
BEGIN
    IF pg_notification_queue_usage() > 0.5 THEN
        RAISE WARNING 'live_notify: the NOTIFY queue is % %% full; changes to % arrive late',
            round(pg_notification_queue_usage() * 100), TG_TABLE_NAME;
        RETURN NULL;
    END IF;
    NOTIFY live_changes;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Makes a table live: gives it its triggers, live_stamp (naming the text columns a tombstone
-- empties), live_tombstone, live_purged, live_truncated and live_notify (which TRUNCATE rings
-- too). It creates a trigger only when it is missing or
-- different: a start that finds them in place takes no lock on the table. (Any session, even of
-- a role with no rights, can hold a lock on a table it can name, with PREPARE, that CREATE
-- TRIGGER would wait for.) The table needs the columns id, version, deleted, created_at and
-- updated_at, as the one below has them.
CREATE OR REPLACE PROCEDURE make_live(live_table regclass, VARIADIC emptied text[] DEFAULT '{}')
AS $$
DECLARE
    target text := (SELECT format('%s.%I', relnamespace::regnamespace, relname)
                    FROM pg_class WHERE oid = live_table);
    names text := (SELECT string_agg(quote_literal(name), ', ') FROM unnest(emptied) AS name);
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY[
        format('CREATE TRIGGER live_stamp BEFORE INSERT OR UPDATE ON %s'
               ' FOR EACH ROW EXECUTE FUNCTION live_stamp(%s)', target, names),
        format('CREATE TRIGGER live_tombstone BEFORE DELETE ON %s'
               ' FOR EACH ROW EXECUTE FUNCTION live_tombstone()', target),
        format('CREATE TRIGGER live_purged AFTER DELETE ON %s REFERENCING OLD TABLE AS purged'
               ' FOR EACH STATEMENT EXECUTE FUNCTION live_purged()', target),
        format('CREATE TRIGGER live_truncated AFTER TRUNCATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION live_truncated()', target),
        format('CREATE TRIGGER live_notify AFTER INSERT OR DELETE OR UPDATE OR TRUNCATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION live_notify()', target)]
    LOOP
        IF NOT EXISTS (SELECT FROM pg_trigger
                       WHERE tgrelid = live_table AND pg_get_triggerdef(oid) = wanted) THEN
            EXECUTE replace(wanted, 'CREATE TRIGGER', 'CREATE OR REPLACE TRIGGER');
        END IF;
    END LOOP;
END $$ LANGUAGE plpgsql;

-- ==== your table: newsletters ================================================================

CREATE TABLE IF NOT EXISTS newsletters (
    id          bigserial   PRIMARY KEY,
    title       text        NOT NULL,
    content     text        NOT NULL,
    -- The machinery's columns: every live table has them, as they are here.
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

-- Live, and a tombstone empties its title and content.
CALL make_live('newsletters', 'title', 'content');

-- What the change stream reads (app.py's CHANGES_AFTER): every live table's rows, one SELECT per
-- table joined by UNION ALL. Each says its table (the SSE event name, which the page's
-- addEventListener names), its id, its version, its size (the length of its JSON, as sent: a read
-- of the stream takes about PAGE_BYTES of it) and its JSON, the SSE event's data.
CREATE OR REPLACE FUNCTION live_rows()
RETURNS TABLE (tbl text, id bigint, version bigint, size integer, data text) AS $$
    SELECT 'newsletters', id, version, octet_length(newsletter_json(n)), newsletter_json(n)
    FROM newsletters AS n
$$ LANGUAGE sql STABLE;

-- ==== end of your table =======================================================================

-- ==== upgrades of databases made by older versions of this file ==============================
-- A copy for another table may delete this part; it does nothing where there are no newsletters.

-- A table made before the title rule ignored tabs and line breaks as the content rule does gets
-- the new rule (NOT VALID: rows already written are not checked again).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint
                   WHERE conrelid = to_regclass('newsletters')
                     AND conname = 'title must be 1 to 200 characters'
                     AND position(E'\t' IN pg_get_constraintdef(oid)) > 0)
       AND to_regclass('newsletters') IS NOT NULL THEN
        ALTER TABLE newsletters DROP CONSTRAINT IF EXISTS "title must be 1 to 200 characters";
        ALTER TABLE newsletters ADD CONSTRAINT "title must be 1 to 200 characters"
            CHECK (deleted OR char_length(btrim(title, E' \t\r\n')) BETWEEN 1 AND 200) NOT VALID;
    END IF;
END $$;

-- Newsletters from before the shared machinery had a sequence, an advisory lock, triggers and a
-- channel of their own. The shared sequence goes on from where theirs stopped, so browsers
-- holding versions from before resume exactly; then the old triggers, functions and sequence
-- go, so that nothing draws from the old sequence again. (make_live above has already locked
-- the table against writers, until this transaction commits.)
DO $$
BEGIN
    IF to_regclass('newsletters_version') IS NOT NULL THEN
        PERFORM setval('live_version', last_value, is_called) FROM newsletters_version;
        DROP TRIGGER IF EXISTS newsletters_stamp ON newsletters;
        DROP TRIGGER IF EXISTS newsletters_tombstone ON newsletters;
        DROP TRIGGER IF EXISTS newsletters_notify ON newsletters;
        DROP FUNCTION IF EXISTS newsletters_stamp(), newsletters_tombstone(), newsletters_notify();
        DROP SEQUENCE newsletters_version;
    END IF;
END $$;
