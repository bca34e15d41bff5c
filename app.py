"""Live newsletter: PostgreSQL LISTEN/NOTIFY to Server-Sent Events, in one file.

  a write (page, API or psql) -> trigger: a version in commit order, a NOTIFY without payload -> one LISTEN per
  process reads the change once -> its frame is written to every caught-up stream's socket -> EventSource

Run it:  python app.py          (or DATABASE_URL=postgresql://user@host/db python app.py)
Try it:  psql -c "INSERT INTO newsletters (title, content) VALUES ('Hello', 'from psql')"
"""
from gevent import monkey
monkey.patch_all()  # first of all: sockets, select() and sleep() must yield to other greenlets

import collections, contextlib, gc, hmac, itertools, json, logging, os, pathlib, re, resource, select, signal, sys

import bottle, gevent, gevent.event, gevent.lock, gevent.queue, gevent.socket, psycopg2, psycopg2.errors, psycopg2.extras
from bottle import abort, request, response
from gevent.pywsgi import WSGIHandler, WSGIServer
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
LOG_SIZE = 1000        # recently changed rows kept in memory, so resuming clients cost no query
NEWEST = 100           # live newsletters a new client gets before "ready"
MAX_BODY = 1_150_000   # bytes of request body: room for 1 MiB of content (schema.sql's limit) and JSON
HERE = os.path.dirname(os.path.abspath(__file__))  # schema.sql and index.html live beside this file
COLUMNS = "id, title, content, created_at, updated_at, version, deleted"

# ---- database ---------------------------------------------------------------
def wait(conn):
    """psycopg2 wait callback (psycogreen's loop; any other state is a KeyError): other greenlets run meanwhile."""
    while (state := conn.poll()) != POLL_OK:  # a deadline, too: a silently dropped network path would wait forever
        late = psycopg2.OperationalError(f"no answer from the database within {DB_TIMEOUT}s")
        {POLL_READ: gevent.socket.wait_read, POLL_WRITE: gevent.socket.wait_write}[state](conn.fileno(), DB_TIMEOUT, late)

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
        logging.warning("database unavailable for %s %s: %s", request.method, request.path, first_line(e))
        abort(503, "the database is unavailable; try again shortly")
    finally:
        pool.put(conn if conn and not conn.closed else None)

to_json = json.JSONEncoder(ensure_ascii=False, default=lambda t: t.isoformat()).encode  # timestamps: ISO 8601

def frame(row):
    """One change as an SSE frame: built once, then sent as-is to every stream."""
    data = {"id": row["id"], "version": row["version"], "deleted": True} if row["deleted"] else row
    return b"id: %d\nevent: newsletter\ndata: %s\n\n" % (row["version"], to_json(data).encode())

# ---- schema -----------------------------------------------------------------
def apply_schema():
    """Create or update table and triggers; return the newest version, where the listener starts."""
    with contextlib.closing(connect()) as conn, conn, conn.cursor() as cur:  # one transaction, committed at the end
        cur.execute(pathlib.Path(HERE, "schema.sql").read_text())
        cur.execute("SELECT coalesce(max(version), 0) AS v FROM newsletters")
        return cur.fetchone()["v"]

# ---- listener ---------------------------------------------------------------
head = floor = 0                    # newest version this process has read; the log holds every change after floor
recent = collections.OrderedDict()  # row id -> (version, frame): each recent row's newest state, in version order
listening, clients = False, 0       # /healthz answers 503 while not listening; the number of open streams

def fetch(conn):
    """Read every change after head once, encode it once, log it, and write it to every caught-up stream."""
    global head, floor
    (cur := conn.cursor()).execute(f"SELECT {COLUMNS} FROM newsletters WHERE version > %s ORDER BY version", (head,))
    rows = cur.fetchall()
    for row in rows:
        recent.pop(row["id"], None)  # a row's older state is superseded: the table holds only the newest
        recent[row["id"]] = (row["version"], frame(row))
    while len(recent) > LOG_SIZE:
        floor = recent.popitem(last=False)[1][0]
    head = rows[-1]["version"] if rows else head
    broadcast(b"".join(recent[row["id"]][1] for row in rows) or b": ping\n\n")  # nothing new: quiet streams ping

def listen():
    """Forever: connect, LISTEN, catch up, then read changes whenever the doorbell rings."""
    global listening
    delay = 0.25
    while True:
        try:
            with contextlib.closing(connect()) as conn:
                conn.autocommit = True  # LISTEN acts at once, and no transaction stays open while we wait
                conn.cursor().execute("LISTEN newsletters")
                while True:  # read (first after LISTEN: a change committed in between is read now, or rings later)
                    fetch(conn)  # a query with a deadline (the wait callback): it also proves the connection alive
                    listening, delay = True, 0.25
                    if readable(conn, CHECK_EVERY):  # the doorbell, or CHECK_EVERY seconds: a missed ring is caught
                        conn.poll()
                        conn.notifies.clear()  # the table is the truth: many rings, one query
        except Exception as e:  # outermost loop: log it, back off (0.5s, doubling up to 8s), reconnect, catch up
            listening, delay = False, min(delay * 2, 8)
            logging.warning("listener lost the database (%s); reconnecting in %.1fs", first_line(e), delay)
            gevent.sleep(delay)

# ---- fan-out ----------------------------------------------------------------
parked = {}  # socket descriptor -> (descriptor, wake-up, HTTP/1.1?) of each stream that has every change up to head

def broadcast(batch):
    """Write one batch to every parked stream, framed once; a stream's greenlet wakes only if its client lags."""
    framed = b"%x\r\n%s\r\n" % (len(batch), batch)  # one HTTP/1.1 chunk, the same bytes for every stream
    for fd, wake, chunked in list(parked.values()):  # (no new tuple per stream: they would set off full collections)
        data, sent = framed if chunked else batch, 0
        with contextlib.suppress(OSError):  # full (BlockingIOError) or gone: the stream's greenlet finds out which
            sent = os.write(fd, data)  # non-blocking, and no greenlet switch: a full socket buffer takes less
        if sent < len(data):
            del parked[fd]
            wake.set((data[sent:], head))  # the rest, framed, for the stream to send at its client's pace

first_page, first_page_lock = [-1, b""], gevent.lock.Semaphore()  # [version, the newest live newsletters then]

def since(cursor):
    """Frames of every change after cursor (each row's newest state, in version order), and the new cursor."""
    if cursor is None:  # a new client: the newest live newsletters as of head; what changed since follows from the log
        with first_page_lock:  # a storm of new clients waits for one query instead of each sending its own
            if first_page[0] != head:
                cursor = head  # read once: the query yields, and head may move meanwhile
                rows = query(f"SELECT * FROM (SELECT {COLUMNS} FROM newsletters WHERE NOT deleted AND version <= %s"
                             " ORDER BY id DESC LIMIT %s) AS newest ORDER BY version", cursor, NEWEST)
                first_page[:] = cursor, b"".join(map(frame, rows))
            return first_page[1], first_page[0]
    if cursor >= floor:  # the in-memory log reaches back far enough: no query
        newer = itertools.takewhile(lambda entry: entry[0] > cursor, reversed(recent.values()))
        return b"".join(reversed([f for _, f in newer])), max(cursor, head)
    rows = query(f"SELECT {COLUMNS} FROM newsletters WHERE version > %s ORDER BY version", cursor)
    return b"".join(map(frame, rows)), rows[-1]["version"] if rows else cursor

# ---- routes -----------------------------------------------------------------
app = bottle.Bottle()
bottle.BaseResponse.default_content_type = "application/json"  # every answer is JSON unless a route says otherwise
app.default_error_handler = lambda res: to_json({"error": res.body})  # our own words: tracebacks go to the log only

@app.hook("before_request")
def authorize():
    """With WRITE_TOKEN set, writes need it as a bearer token (raw: Bottle's decoded header fails on bad bytes)."""
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
    cursor = int(given[0]) if given else None
    reset = (cursor or 0) > head and cursor > query("SELECT coalesce(max(version), 0) AS v FROM newsletters")[0]["v"]
    frames, cursor = since(None if reset else cursor)  # reset: the database was recreated, so start over
    response.headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                             "X-Accel-Buffering": "no"})  # nginx: pass each frame on at once
    sock, chunked = request.environ["newsletter.socket"], request.environ["SERVER_PROTOCOL"] != "HTTP/1.0"
    chunk = lambda data: b"%x\r\n%s\r\n" % (len(data), data) if chunked and data else data  # HTTP/1.0: as it is
    ready = b"id: %d\nevent: ready\ndata: {\"version\": %d}\n\n" % (cursor, cursor)
    frames = chunk(b"event: reset\ndata: {}\n\n" * reset + frames + ready)
    clients += 1
    try:
        yield b"retry: 2000\n\n"  # pywsgi sends the headers with it; after it, frames go straight to the socket
        while True:
            sock.sendall(frames)  # blocks this greenlet only, at most CLIENT_TIMEOUT
            del frames  # a parked stream pins no frames: its memory is its socket, not the changes
            if head > cursor:  # behind (just connected, or its client was slow): catch up at the client's pace
                frames, cursor = since(cursor)
                frames = chunk(frames)
            else:  # caught up: broadcast() writes for it from now on, and wakes it only if its client lags
                parked[sock.fileno()] = (sock.fileno(), wake := gevent.event.AsyncResult(), chunked)
                frames, cursor = wake.get()  # what broadcast() could not write, framed already
    except (bottle.HTTPError, OSError):  # the database went away, or the client did: it resumes later
        return
    finally:  # also when the server is stopping
        parked.pop(sock.fileno(), None)
        clients -= 1

@app.get("/healthz")
def healthz():
    """200 while the listener is connected, else 503."""
    return to_json({"ok": True, "version": head, "clients": clients}) if listening else abort(503, "not listening")

class Handler(WSGIHandler):
    """pywsgi's handler, with a smaller read buffer, the socket lent to streams, and two headers for browsers."""
    def __init__(self, sock, *args):
        super().__init__(sock, *args)
        self.rfile = sock.makefile("rb", 512)  # a stream reads one request: 8 KB of buffer was a third of its memory
    def get_environ(self):  # once pywsgi has sent a stream's headers, the stream writes to the socket itself
        environ, self.headers = super().get_environ(), None  # the parsed request headers (1 KB) are in environ now
        return {**environ, "newsletter.socket": self.socket}
    def start_response(self, status, headers, exc_info=None):  # every response: don't guess types, don't leak URLs
        safety = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]
        return super().start_response(status, headers + safety, exc_info)

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
    gc.set_threshold(700, 10, 1000)  # full collections visit every stream's objects (0.7s at 10,000): 100x rarer
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    gevent.socket.setdefaulttimeout(CLIENT_TIMEOUT)  # applies to accepted client sockets, not to libpq's
    if not WRITE_TOKEN and HOST not in ("localhost", "::1") and not HOST.startswith("127."):
        logging.warning("warning: HOST=%s and WRITE_TOKEN is unset: anyone who can reach this port can write", HOST)
    gevent.spawn(listen)
    server = WSGIServer((HOST, PORT), app, log=None, backlog=4096, handler_class=Handler)  # backlog: connection storms
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, server.stop, 1)  # close streams, wait at most 1s, return from serve_forever
    logging.info("serving on http://%s:%d (version %d)", HOST, PORT, head)
    server.serve_forever()

if __name__ == "__main__":
    main()
