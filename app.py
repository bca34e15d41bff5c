"""Live newsletter: PostgreSQL LISTEN/NOTIFY to Server-Sent Events, in one file.

  a write (page, API or psql) -> trigger: a new version, in commit order, and NOTIFY (no payload)
  -> one LISTEN connection per process -> SELECT ... WHERE version > head, once, each change encoded once
  -> every GET /events stream sends the frames after its own cursor -> the browser's EventSource

Run it:  python app.py          (or DATABASE_URL=postgresql://user@host/db python app.py)
Try it:  psql -c "INSERT INTO newsletters (title, content) VALUES ('Hello', 'from psql')"
"""
from gevent import monkey
monkey.patch_all()  # first of all: sockets, select() and sleep() must yield to other greenlets

import collections, contextlib, hmac, itertools, json, logging, os, re, resource, select, signal, socket, sys

import bottle, gevent, gevent.event, gevent.lock, gevent.queue, psycopg2, psycopg2.errors, psycopg2.extras
from bottle import abort, request, response
from gevent.pywsgi import WSGIServer
from gevent.socket import wait_read, wait_write
from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

# ---- configuration ----------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")  # unset: libpq's defaults and PG* variables
HOST = os.environ.get("HOST", "127.0.0.1")         # 0.0.0.0 to serve other machines
PORT = int(os.environ.get("PORT", "8000"))
WRITE_TOKEN = os.environ.get("WRITE_TOKEN", "")    # set: writes need "Authorization: Bearer <token>"
POOL_SIZE = 4          # connections for request handlers; the listener holds one more
DB_TIMEOUT = 5         # seconds one database round trip may take before the connection counts as dead
CHECK_EVERY = 15       # seconds the listener waits for a NOTIFY before it looks anyway; quiet streams ping then
CLIENT_TIMEOUT = 30    # seconds a client may take to send a request or accept a write, then it is dropped
GATHER = 0.02          # seconds the listener lets a burst gather after reading changes: fewer queries and writes
LOG_SIZE = 1000        # recently changed rows kept in memory, so resuming clients cost no query
NEWEST = 100           # live newsletters a new client gets before "ready"
MAX_BODY = 1_150_000   # bytes of request body: room for 1 MiB of content (schema.sql's limit) and JSON
HERE = os.path.dirname(os.path.abspath(__file__))  # schema.sql and index.html live beside this file
COLUMNS = "id, title, content, created_at, updated_at, version, deleted"
log = logging.getLogger("newsletter")

# ---- database ---------------------------------------------------------------
def wait(conn):
    """psycopg2 wait callback: let other greenlets run while a query waits on the network."""
    # psycogreen's loop, plus a deadline: a silently dropped network path would leave a query waiting forever.
    while (state := conn.poll()) != POLL_OK:
        late = psycopg2.OperationalError(f"no answer from the database within {DB_TIMEOUT}s")
        {POLL_READ: wait_read, POLL_WRITE: wait_write}[state](conn.fileno(), DB_TIMEOUT, late)  # else KeyError

psycopg2.extensions.set_wait_callback(wait)  # every query below, the listener's included, now yields

def connect():
    """A new connection; rows come back as dicts, ready to be JSON."""
    return psycopg2.connect(DATABASE_URL, fallback_application_name="newsletter",
                            cursor_factory=psycopg2.extras.RealDictCursor)

def readable(conn, timeout):
    """Whether the server has sent something, waiting at most timeout seconds (poll: select() stops at fd 1024)."""
    (probe := select.poll()).register(conn, select.POLLIN)
    return bool(probe.poll(timeout * 1000))

pool = gevent.queue.LifoQueue(items=[None] * POOL_SIZE)  # idle request connections, warmest first; None: not opened yet

def query(sql, *args):
    """All rows of one statement, in its own transaction on a pooled connection; a database that is down is a 503."""
    try:
        conn = pool.get(timeout=DB_TIMEOUT)
    except gevent.queue.Empty:
        abort(503, "every database connection is busy; try again shortly")
    try:
        if conn and readable(conn, 0):  # an idle connection says nothing unless the server hung up
            conn.close()  # (a restart, a killed backend): don't hand out a connection that is sure to fail
        conn = conn if conn and not conn.closed else connect()
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    except psycopg2.errors.CheckViolation as e:  # schema.sql names each rule after its message
        abort(400, e.diag.constraint_name)
    except ValueError:  # psycopg2 will not send a NUL character or an unpaired surrogate
        abort(400, "text must not contain NUL characters or unpaired surrogates")
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
        conn = conn and conn.close()  # broken or mid-query: the next borrower opens a fresh one
        log.warning("database unavailable for %s %s: %s", request.method, request.path, first_line(e))
        abort(503, "the database is unavailable; try again shortly")
    finally:
        pool.put(conn if conn and not conn.closed else None)

def to_json(value):
    """JSON text; timestamps become ISO 8601 with their offset."""
    return json.dumps(value, ensure_ascii=False, default=lambda t: t.isoformat())

def frame(row):
    """One change as an SSE frame: built once, then sent as-is to every stream."""
    data = {"id": row["id"], "version": row["version"], "deleted": True} if row["deleted"] else row
    return b"id: %d\nevent: newsletter\ndata: %s\n\n" % (row["version"], to_json(data).encode())

# ---- schema -----------------------------------------------------------------
def apply_schema():
    """Create or update table and triggers; return the newest version, where the listener starts."""
    with contextlib.closing(connect()) as conn, conn, conn.cursor() as cur:  # one transaction, committed at the end
        cur.execute("SELECT pg_advisory_lock(hashtext('newsletters_schema'))")  # processes starting together take turns
        with open(os.path.join(HERE, "schema.sql")) as f:
            cur.execute(f.read())
        cur.execute("SELECT coalesce(max(version), 0) AS v FROM newsletters")
        return cur.fetchone()["v"]

# ---- listener ---------------------------------------------------------------
head = floor = 0                    # newest version this process has read; the log holds every change after floor
recent = collections.OrderedDict()  # row id -> (version, frame): each recent row's newest state, in version order
news = gevent.event.Event()         # set, then replaced, after every read of the table
listening, clients = False, 0       # /healthz answers 503 while not listening; the number of open streams

def fetch(conn):
    """Read every change after head once, encode it once, log it, and wake every stream."""
    global head, floor, news
    with conn.cursor() as cur:
        cur.execute(f"SELECT {COLUMNS} FROM newsletters WHERE version > %s ORDER BY version", (head,))
        rows = cur.fetchall()
    for row in rows:
        recent.pop(row["id"], None)  # a row's older state is superseded: the table holds only the newest
        recent[row["id"]] = (row["version"], frame(row))
    while len(recent) > LOG_SIZE:
        floor = recent.popitem(last=False)[1][0]
    head = rows[-1]["version"] if rows else head
    woken, news = news, gevent.event.Event()
    woken.set()  # also when nothing changed: then quiet streams send a ping
    gevent.sleep(GATHER if rows else 0)  # in a burst, the next query and each stream's next write cover many

def listen():
    """Forever: connect, LISTEN, catch up, then read changes whenever the doorbell rings."""
    global listening
    delay = 0.5
    while True:
        try:
            with contextlib.closing(connect()) as conn:
                conn.autocommit = True  # LISTEN acts at once, and no transaction stays open while we wait
                conn.cursor().execute("LISTEN newsletters")
                fetch(conn)  # after LISTEN: a change committed in between is read now, or rings later
                listening, delay = True, 0.5
                while True:  # wait for the doorbell, at most CHECK_EVERY: then the query catches a missed ring
                    if readable(conn, CHECK_EVERY):
                        conn.poll()
                        conn.notifies.clear()  # the table is the truth: many rings, one query
                    fetch(conn)  # a query with a deadline (the wait callback): it also proves the connection alive
        except Exception as e:  # outermost loop: log it, back off, reconnect, catch up
            listening = False
            log.warning("listener lost the database (%s); reconnecting in %.1fs", first_line(e), delay)
            gevent.sleep(delay)
            delay = min(delay * 2, 8)

# ---- fan-out ----------------------------------------------------------------
def since(cursor):
    """Frames of every change after cursor (each row's newest state, in version order), and the new cursor."""
    if cursor >= floor:  # the in-memory log reaches back far enough: no query
        newer = itertools.takewhile(lambda entry: entry[0] > cursor, reversed(recent.values()))
        return b"".join(reversed([f for _, f in newer])), max(cursor, head)
    rows = query(f"SELECT {COLUMNS} FROM newsletters WHERE version > %s ORDER BY version", cursor)
    return b"".join(map(frame, rows)), rows[-1]["version"] if rows else cursor

first_page, first_page_lock = (-1, b""), gevent.lock.Semaphore()  # (version, the newest live newsletters then)

def snapshot():
    """A new client's start: the newest live newsletters as of head; what changed since follows from the log."""
    global first_page
    with first_page_lock:  # a storm of new clients waits for one query instead of each sending its own
        if first_page[0] != head:
            cursor = head  # read once: the query yields, and head may move meanwhile
            rows = query(f"SELECT * FROM (SELECT {COLUMNS} FROM newsletters WHERE NOT deleted AND version <= %s"
                         " ORDER BY id DESC LIMIT %s) AS newest ORDER BY version", cursor, NEWEST)
            first_page = (cursor, b"".join(map(frame, rows)))
        return first_page[1], first_page[0]

# ---- routes -----------------------------------------------------------------
app = bottle.Bottle()

def json_error(res):
    """Every error as {"error": "..."}; a client never sees a traceback."""
    response.content_type = "application/json"
    return to_json({"error": res.body})  # our own words; tracebacks go to the log only
app.default_error_handler = json_error

@app.hook("before_request")
def authorize():
    """Answers are JSON unless a route says otherwise; with WRITE_TOKEN set, writes need it as a bearer token."""
    response.content_type = "application/json"  # (the raw header below: Bottle's decoded one fails on bad bytes)
    if WRITE_TOKEN and request.method in ("POST", "PUT", "DELETE") and not hmac.compare_digest(
            request.environ.get("HTTP_AUTHORIZATION", "").encode("latin-1"), b"Bearer " + WRITE_TOKEN.encode()):
        abort(401, "writing needs the header Authorization: Bearer <WRITE_TOKEN>")

def read_newsletter():
    """The body's (title, content), or a 4xx that says what is wrong."""
    if request.content_length > MAX_BODY:
        abort(413, "the request body is too large")
    try:
        data = json.loads(request.body.read())
    except (ValueError, RecursionError, OSError):  # OSError: the body did not arrive within CLIENT_TIMEOUT
        abort(400, 'the body must be complete JSON: {"title": "...", "content": "..."}')
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("title", "content")):
        abort(400, "the body must be a JSON object with string fields title and content")
    return data["title"].strip(), data["content"]  # the table's constraints check the rest

@app.get("/")
def index():
    """The page, allowed nothing from other origins."""
    return bottle.static_file("index.html", root=HERE, headers={"Content-Security-Policy": "default-src 'self';"
        " style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"})

@app.get("/newsletters")
def list_newsletters():
    """Live newsletters, newest first, a page at a time (?limit=, ?before=<id>)."""
    limit, before = request.query.limit or "50", request.query.before or "999999999999999999"
    if not re.fullmatch(r"0*[1-9][0-9]{0,3}", limit) or not re.fullmatch(r"[0-9]{1,18}", before):
        abort(400, "limit must be a whole number from 1 to 200, before an id")
    return to_json(query(f"SELECT {COLUMNS} FROM newsletters WHERE NOT deleted AND id < %s ORDER BY id DESC"
                         " LIMIT %s", int(before), min(int(limit), 200)))

@app.post("/newsletters")
def publish():
    """A new newsletter; open pages learn of it through the trigger, like any other write."""
    row = query(f"INSERT INTO newsletters (title, content) VALUES (%s, %s) RETURNING {COLUMNS}", *read_newsletter())[0]
    response.status, response["Location"] = 201, f"/newsletters/{row['id']}"
    return to_json(row)

@app.put("/newsletters/<nid:re:[0-9]{1,18}>")  # any other id, negative or beyond bigint: no route, 404
def edit(nid):
    """New title and content for a live newsletter."""
    rows = query(f"UPDATE newsletters SET title = %s, content = %s WHERE id = %s AND NOT deleted"
                 f" RETURNING {COLUMNS}", *read_newsletter(), int(nid))
    return to_json(rows[0]) if rows else abort(404, "no such newsletter")

@app.delete("/newsletters/<nid:re:[0-9]{1,18}>")
def delete(nid):
    """Delete a newsletter, leaving a tombstone (as a psql DELETE does, through the trigger)."""
    found = query("UPDATE newsletters SET deleted = true WHERE id = %s AND NOT deleted RETURNING id", int(nid))
    response.status = 204 if found else abort(404, "no such newsletter")

@app.get("/events")
def events():
    """The change stream: catch-up from the client's cursor, "ready", then every change as it commits."""
    global clients  # Bottle runs a generator route up to its first yield before answering, so abort() works
    given = [v for v in (request.environ.get("HTTP_LAST_EVENT_ID", ""), request.query.since) if re.fullmatch("[0-9]{1,19}", v)]
    cursor, first = (int(given[0]) if given else None), b""
    if cursor is not None and cursor > head and cursor > query("SELECT coalesce(max(version), 0) AS v FROM newsletters")[0]["v"]:
        cursor, first = None, b"event: reset\ndata: {}\n\n"  # the database was recreated: start over
    frames, cursor = snapshot() if cursor is None else since(cursor)
    response.headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                             "X-Accel-Buffering": "no"})  # nginx: pass each frame on at once
    clients += 1
    try:
        yield b"retry: 2000\n\n"  # small on purpose: Bottle keeps a stream's first chunk until it ends
        yield b"%s%sid: %d\nevent: ready\ndata: {\"version\": %d}\n\n" % (first, frames, cursor, cursor)
        del first, frames  # a parked stream pins no frames: its memory is its socket, not the changes
        while True:
            if head > cursor:
                frames, cursor = since(cursor)
                yield frames
                del frames
            else:  # no timer of its own: with thousands of streams, timers cost more than the sends
                news.wait()  # set after every read of the table: a change, or CHECK_EVERY quiet seconds
                if head <= cursor:
                    yield b": ping\n\n"  # a quiet stream says it is alive, so proxies keep it open
    except bottle.HTTPError:  # the database went away while reading old changes: the client resumes later
        return
    finally:  # the client went away (a write failed or timed out) or the server is stopping
        clients -= 1

@app.get("/healthz")
def healthz():
    """200 while the listener is connected, else 503."""
    return to_json({"ok": True, "version": head, "clients": clients}) if listening else abort(503, "not listening")

def protected(environ, start_response):
    """Every response, errors included, tells browsers not to guess content types or leak URLs."""
    extra = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]
    return app(environ, lambda status, headers, *exc: start_response(status, headers + extra, *exc))

# ---- main -------------------------------------------------------------------
def first_line(error):
    """An exception's first line: enough for a log, never a traceback."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]

def main():
    """Check the database, apply the schema, start the listener, serve until SIGINT or SIGTERM."""
    global head, floor
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        head = floor = apply_schema()
    except psycopg2.OperationalError as e:
        where = re.sub(r":[^:@/]*@", ":***@", DATABASE_URL) or "DATABASE_URL unset"  # never print a password
        sys.exit(f"error: cannot reach PostgreSQL ({where}): {first_line(e)}."
                 " Set DATABASE_URL, start PostgreSQL, or run `docker compose up`.")
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    socket.setdefaulttimeout(CLIENT_TIMEOUT)  # applies to accepted client sockets, not to libpq's
    if not WRITE_TOKEN and HOST not in ("localhost", "::1") and not HOST.startswith("127."):
        log.warning("warning: HOST=%s and WRITE_TOKEN is unset: anyone who can reach this port can write", HOST)
    gevent.spawn(listen)
    server = WSGIServer((HOST, PORT), protected, log=None, backlog=4096)  # room for a storm of connects
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, server.stop, 1)  # close streams, wait at most 1s, return from serve_forever
    log.info("serving on http://%s:%d (version %d)", HOST, PORT, head)
    server.serve_forever()

if __name__ == "__main__":
    main()
