"""The live newsletter's specification, run against a real PostgreSQL and the real app.

    pytest                                  starts a private PostgreSQL (initdb + pg_ctl in a temp dir)
    TEST_DATABASE_URL=postgresql://... pytest   uses that server instead; tests that restart it are skipped

Every server a test starts is stopped again, also when the test fails.
"""
import contextlib, glob, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, time
from types import SimpleNamespace
from urllib.parse import quote

import psycopg2
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
POOL_SIZE = 4
WAIT = 20  # seconds: generous, only there so that a broken build fails instead of hanging


# ---- servers ------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name):
    """A PostgreSQL server program: on PATH, in pg_config --bindir, or in Debian's versioned folders."""
    found = [shutil.which(name)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found.append(os.path.join(subprocess.check_output(["pg_config", "--bindir"], text=True).strip(), name))
    found += sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    for path in found:
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip(f"PostgreSQL's {name} was not found; install PostgreSQL or set TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def database():
    """A private PostgreSQL for the whole run, or TEST_DATABASE_URL; `ctl` restarts/stops the private one."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield SimpleNamespace(url=os.environ["TEST_DATABASE_URL"], ctl=None)
        return
    as_postgres = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}  # initdb refuses root
    tmp = tempfile.mkdtemp(prefix="newsletter-pg-")
    if as_postgres:
        shutil.chown(tmp, "postgres", "postgres")
    data, port = os.path.join(tmp, "data"), free_port()
    subprocess.run([pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, **as_postgres)

    def ctl(*args):
        opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
        subprocess.run([pg_bin("pg_ctl"), "-D", data, "-o", opts, "-l", os.path.join(tmp, "log"), "-w", *args],
                       check=True, capture_output=True, **as_postgres)

    ctl("start")
    try:
        yield SimpleNamespace(url=f"postgresql://postgres@127.0.0.1:{port}/postgres", ctl=ctl)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            ctl("-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


def start_app(database_url, **env):
    """`python app.py` as a real subprocess on a free port, once /healthz says it is listening."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port), **env}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "app.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    app = SimpleNamespace(proc=proc, port=port, url=f"http://127.0.0.1:{port}")
    deadline = time.time() + WAIT
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if request("GET", "/healthz", app=app).status == 200:
                return app
        time.sleep(0.1)
    stop_app(app)
    raise AssertionError(f"app did not start: {proc.stdout.read().decode()}")


def stop_app(app, sig=signal.SIGTERM):
    """Stop it, politely first; returns its exit status."""
    if app.proc.poll() is None:
        app.proc.send_signal(sig)
    try:
        return app.proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        return app.proc.wait()


@contextlib.contextmanager
def running_app(database_url, **env):
    app = start_app(database_url, **env)
    try:
        yield app
    finally:
        stop_app(app)


@pytest.fixture(scope="session")
def app(database):
    with running_app(database.url) as app:
        yield app


@pytest.fixture(autouse=True)
def default_app(request):
    """Helpers talk to the session's app unless a test names another."""
    global DEFAULT
    if "app" in request.fixturenames:
        DEFAULT = request.getfixturevalue("app")
    yield


# ---- helper verbs --------------------------------------------------------------
DEFAULT = None
DSN = None


def request(method, path, body=None, headers=None, app=None):
    """One HTTP request; the answer's status, headers and JSON (or text)."""
    app = app or DEFAULT
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=WAIT)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        raw = res.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode(errors="replace")
        return SimpleNamespace(status=res.status, headers=res.headers, json=data)
    finally:
        conn.close()


def publish(title, content="Some news.", app=None):
    res = request("POST", "/newsletters", {"title": title, "content": content}, app=app)
    assert res.status == 201, res.json
    return res.json


def psql(sql, *args, url=None):
    """Run SQL as any other client would (not through the app); rows if it returns any."""
    conn = psycopg2.connect(url or DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def dsn(database):
    global DSN
    DSN = database.url


class Stream:
    """What a browser's EventSource sees: frames read off a real socket."""

    def __init__(self, app, since=None, last_event_id=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=WAIT)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id).encode()
        self.conn.request("GET", "/events" + (f"?since={quote(str(since))}" if since is not None else ""), headers=headers)
        self.response = self.conn.getresponse()
        self.comments = []

    def next(self):
        """The next event as {"id", "event", "data"}; comment lines (pings) are kept aside."""
        event, data = {"id": None, "event": "message"}, []
        while True:
            line = self.response.readline()
            if not line:
                raise EOFError("the stream ended")
            line = line.decode().rstrip("\n")
            if not line and data:
                return dict(event, data=json.loads("\n".join(data)))
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                field, _, value = line.partition(": ")
                if field == "data":
                    data.append(value)
                else:
                    event[field] = value

    def until(self, predicate):
        """Events up to and including the first that matches."""
        seen = []
        while not seen or not predicate(seen[-1]):
            seen.append(self.next())
        return seen

    def ready(self):
        """The catch-up: every newsletter event before `ready`, and ready's version."""
        seen = self.until(lambda e: e["event"] == "ready")
        return [e["data"] for e in seen[:-1]], seen[-1]["data"]["version"]

    def changes(self, count):
        return [self.next()["data"] for _ in range(count)]

    def close(self):
        self.conn.close()


@contextlib.contextmanager
def listen(app=None, since=None, last_event_id=None):
    stream = Stream(app or DEFAULT, since, last_event_id)
    try:
        yield stream
    finally:
        stream.close()


def newest_version():
    return psql("SELECT coalesce(max(version), 0) FROM newsletters")[0][0]


def caught_up(app=None):
    """Wait until the app's listener has read every committed change."""
    deadline = time.time() + WAIT
    while request("GET", "/healthz", app=app).json.get("version") != newest_version():
        assert time.time() < deadline, "the listener did not catch up"
        time.sleep(0.05)


def table_state():
    return psql("SELECT count(*), coalesce(max(version), 0), coalesce(sum(length(content)), 0) FROM newsletters")


# ---- the stream ------------------------------------------------------------------
def test_a_new_client_gets_the_current_newsletters_then_ready(app):
    row = publish("Already here")
    caught_up()
    with listen() as stream:
        assert stream.response.getheader("Content-Type").startswith("text/event-stream")
        assert stream.response.getheader("Cache-Control") == "no-cache"
        assert stream.response.getheader("X-Accel-Buffering") == "no"
        assert stream.response.readline().startswith(b"retry: ")
        catch_up, version = stream.ready()
    assert row in catch_up
    assert version == newest_version()
    assert [r["version"] for r in catch_up] == sorted(r["version"] for r in catch_up)
    assert all(not r["deleted"] for r in catch_up)


def test_a_publish_through_the_api_shows_up_in_the_list_and_on_a_stream(app):
    with listen() as stream:
        stream.ready()
        row = publish("Hello, world", "First line\nsecond line")
        assert stream.next()["data"] == row
    assert row["title"] == "Hello, world" and row["content"] == "First line\nsecond line"
    assert set(row) == {"id", "title", "content", "created_at", "updated_at", "version", "deleted"}
    assert row["created_at"].endswith("+00:00") or "+" in row["created_at"][-6:] or "-" in row["created_at"][-6:]
    assert request("GET", "/newsletters").json[0] == row


def test_the_api_answers_publish_with_201_and_a_location(app):
    res = request("POST", "/newsletters", {"title": "  Trimmed  ", "content": "x"})
    assert res.status == 201
    assert res.headers["Location"] == f"/newsletters/{res.json['id']}"
    assert res.json["title"] == "Trimmed"


def test_psql_insert_update_and_delete_show_up_on_a_stream_delete_as_a_tombstone(app):
    with listen() as stream:
        stream.ready()
        (nid,) = psql("INSERT INTO newsletters (title, content) VALUES ('From psql', 'typed by hand') RETURNING id")[0]
        inserted = stream.next()
        psql("UPDATE newsletters SET content = 'edited by hand' WHERE id = %s", nid)
        updated = stream.next()
        psql("DELETE FROM newsletters WHERE id = %s", nid)
        deleted = stream.next()
    assert inserted["data"]["title"] == "From psql" and inserted["id"] == str(inserted["data"]["version"])
    assert updated["data"]["content"] == "edited by hand" and updated["data"]["version"] > inserted["data"]["version"]
    assert deleted["data"] == {"id": nid, "version": deleted["data"]["version"], "deleted": True}
    assert deleted["data"]["version"] > updated["data"]["version"]
    assert psql("SELECT deleted FROM newsletters WHERE id = %s", nid) == [(True,)]  # the tombstone stays
    assert nid not in [r["id"] for r in request("GET", "/newsletters?limit=200").json]


def test_the_api_edits_and_deletes_and_says_404_for_what_is_gone(app):
    row = publish("To edit")
    with listen(last_event_id=row["version"]) as stream:
        stream.ready()
        res = request("PUT", f"/newsletters/{row['id']}", {"title": "Edited", "content": "new"})
        assert res.status == 200 and res.json["title"] == "Edited"
        assert stream.next()["data"] == res.json
        assert request("DELETE", f"/newsletters/{row['id']}").status == 204
        assert stream.next()["data"] == {"id": row["id"], "version": res.json["version"] + 1, "deleted": True}
    assert request("DELETE", f"/newsletters/{row['id']}").status == 404
    assert request("PUT", f"/newsletters/{row['id']}", {"title": "x", "content": "y"}).status == 404
    assert request("PUT", "/newsletters/999999999", {"title": "x", "content": "y"}).status == 404


def test_a_200_kb_newsletter_round_trips_intact(app):
    content = ("Zürich ☕ 200 KB\n" * 13000)[:200_000]
    with listen() as stream:
        stream.ready()
        row = publish("Big", content)
        assert stream.next()["data"]["content"] == content
    assert request("GET", f"/newsletters?before={row['id'] + 1}&limit=1").json == [row]


def test_a_1_mib_newsletter_from_psql_is_not_limited_by_the_notify_payload(app):
    content = "x" * (1 << 20)
    with listen() as stream:
        stream.ready()
        psql("INSERT INTO newsletters (title, content) VALUES ('One MiB', %s)", content)
        assert stream.next()["data"]["content"] == content


def test_a_client_resuming_with_last_event_id_gets_exactly_the_changes_it_missed_in_order(app):
    with listen() as stream:
        _, cursor = stream.ready()
    missed = [publish(f"Missed {i}") for i in range(5)]
    request("PUT", f"/newsletters/{missed[0]['id']}", {"title": "Missed 0, edited", "content": "x"})
    caught_up()
    with listen(last_event_id=cursor) as stream:
        catch_up, version = stream.ready()
    assert [r["id"] for r in catch_up] == [r["id"] for r in missed[1:]] + [missed[0]["id"]]
    assert catch_up[-1]["title"] == "Missed 0, edited"  # each row once, in its newest state
    assert [r["version"] for r in catch_up] == sorted(r["version"] for r in catch_up)
    assert version == catch_up[-1]["version"]


def test_since_resumes_like_last_event_id_when_there_is_no_header(app):
    cursor = newest_version()
    row = publish("After the cursor")
    caught_up()
    with listen(since=cursor) as stream:
        assert stream.ready() == ([row], row["version"])
    with listen(since=0, last_event_id=row["version"]) as stream:  # the header wins
        assert stream.ready() == ([], row["version"])


def test_a_resume_older_than_the_in_memory_log_is_served_from_the_database(database):
    with running_app(database.url) as app:
        cursor = newest_version()
        rows = [publish(f"Log {i}", app=app) for i in range(3)]
        psql("INSERT INTO newsletters (title, content) SELECT 'bulk ' || i, 'x' FROM generate_series(1, 1100) i")
        caught_up(app)
        with listen(app, last_event_id=cursor) as stream:  # the log keeps 1,000 rows: this reaches further back
            catch_up, version = stream.ready()
    assert [r["id"] for r in catch_up[:3]] == [r["id"] for r in rows] and len(catch_up) == 1103
    assert version == newest_version()


def test_a_rolled_back_transaction_sends_nothing(app):
    with listen() as stream:
        stream.ready()
        conn = psycopg2.connect(DSN)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO newsletters (title, content) VALUES ('Never', 'rolled back')")
        conn.rollback()
        conn.close()
        row = publish("After the rollback")
        assert stream.next()["data"] == row  # nothing came before it


def test_a_cursor_beyond_the_newest_version_gets_reset_then_a_fresh_start(app):
    with listen(last_event_id=newest_version() + 1000) as stream:
        first = stream.next()
        catch_up, version = stream.ready()
    assert first["event"] == "reset"
    assert version == newest_version() and all(not r["deleted"] for r in catch_up)


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "", "99999999999999999999999", "１２"])
def test_a_cursor_that_is_not_a_non_negative_integer_is_treated_as_absent(app, cursor):
    with listen(last_event_id=cursor) as stream:
        assert stream.next()["event"] in ("newsletter", "ready")
    with listen(since=cursor) as stream:
        assert stream.next()["event"] in ("newsletter", "ready")


def test_a_quiet_stream_gets_only_live_changes_after_ready(app):
    with listen(last_event_id=newest_version()) as stream:
        assert stream.ready() == ([], newest_version())
        rows = [publish(f"Live {i}") for i in range(3)]
        assert stream.changes(3) == rows


# ---- the REST API ------------------------------------------------------------------
def test_the_list_is_newest_first_and_paginated(app):
    rows = [publish(f"Page {i}") for i in range(5)]
    first = request("GET", "/newsletters?limit=2")
    assert [r["id"] for r in first.json] == [rows[4]["id"], rows[3]["id"]]
    assert f"before={rows[3]['id']}" in first.headers["Link"]
    second = request("GET", f"/newsletters?limit=2&before={rows[3]['id']}")
    assert [r["id"] for r in second.json] == [rows[2]["id"], rows[1]["id"]]
    assert len(request("GET", "/newsletters?limit=1000").json) <= 200
    assert len(request("GET", "/newsletters").json) <= 50


def test_healthz_reports_the_version_and_the_number_of_streams(app):
    with listen() as stream:
        stream.ready()
        res = request("GET", "/healthz")
    assert res.status == 200 and res.json["ok"] is True
    assert res.json["version"] == newest_version() and res.json["clients"] >= 1


def test_the_page_is_served_with_no_outside_resources(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=WAIT)
    conn.request("GET", "/")
    res = conn.getresponse()
    page = res.read().decode()
    assert res.status == 200 and "<title>Live newsletter</title>" in page
    assert "http://" not in page and "https://" not in page and "innerHTML =" not in page
    assert "default-src 'self'" in res.getheader("Content-Security-Policy")
    assert res.getheader("X-Content-Type-Options") == "nosniff"


BIG = "x" * ((1 << 20) + 1)
BAD_WRITES = [
    ("not JSON", b"{nope"),
    ("truncated JSON", b'{"title": "a", "content": "b'),
    ("a JSON array", [{"title": "a", "content": "b"}]),
    ("a JSON string", "just text"),
    ("an empty body", b""),
    ("no title", {"content": "b"}),
    ("no content", {"title": "a"}),
    ("a number for a title", {"title": 5, "content": "b"}),
    ("a list for content", {"title": "a", "content": ["b"]}),
    ("a blank title", {"title": "   ", "content": "b"}),
    ("a 201-character title", {"title": "t" * 201, "content": "b"}),
    ("empty content", {"title": "a", "content": ""}),
    ("blank content", {"title": "a", "content": " \n "}),
    ("a NUL in the title", {"title": "a\u0000b", "content": "b"}),
    ("a NUL in the content", {"title": "a", "content": "b\u0000"}),
    ("an unpaired surrogate", b'{"title": "a\\ud800", "content": "b"}'),
    ("content over 1 MiB", {"title": "a", "content": BIG}),
    ("a body over 1.1 MiB", b'{"title": "a", "content": "' + b"x" * 1_200_000 + b'"}'),
    ("invalid UTF-8", b'{"title": "\xff\xfe", "content": "b"}'),
    ("deeply nested JSON", b"[" * 100_000),
]


@pytest.mark.parametrize("what, body", BAD_WRITES, ids=[w for w, _ in BAD_WRITES])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_bad_input_gets_a_4xx_json_error_and_changes_nothing(app, what, body, method):
    target = publish("Target of bad edits") if method == "PUT" else None
    before = table_state()
    res = request(method, f"/newsletters/{target['id']}" if target else "/newsletters", body,
                  headers={"Content-Type": "application/json"})
    assert 400 <= res.status < 500, (what, res.status, res.json)
    assert isinstance(res.json, dict) and isinstance(res.json["error"], str) and "Traceback" not in res.json["error"]
    assert table_state() == before
    assert request("GET", "/healthz").status == 200


@pytest.mark.parametrize("method, path", [
    ("PUT", "/newsletters/abc"), ("PUT", "/newsletters/-1"), ("DELETE", "/newsletters/99999999999999999999"),
    ("PUT", "/newsletters/9223372036854775808"), ("PUT", "/newsletters/1.5"), ("DELETE", "/newsletters/-7"),
    ("DELETE", "/newsletters/99999999999999999999"), ("GET", "/nowhere"), ("PATCH", "/newsletters"),
    ("GET", "/newsletters?limit=abc"), ("GET", "/newsletters?limit=0"), ("GET", "/newsletters?before=xyz"),
    ("POST", "/events"), ("DELETE", "/newsletters"),
])
def test_bad_ids_methods_and_paths_get_a_4xx_json_error(app, method, path):
    before = table_state()
    res = request(method, path, {"title": "a", "content": "b"} if method in ("PUT", "POST") else None)
    assert 400 <= res.status < 500 and isinstance(res.json["error"], str)
    assert table_state() == before


# ---- resources and startup ------------------------------------------------------------
def app_connections(name):
    return psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", name)[0][0]


def test_200_streams_hold_at_most_pool_plus_one_database_connections(database):
    with running_app(database.url, PGAPPNAME="newsletter-200") as app:
        socks = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", app.port), timeout=WAIT)
                s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
            for s in socks:
                got = b""
                while b"event: ready" not in got:
                    chunk = s.recv(65536)
                    assert chunk, "stream closed before ready"
                    got += chunk
            assert request("GET", "/healthz", app=app).json["clients"] == 200
            assert 1 <= app_connections("newsletter-200") <= POOL_SIZE + 1
        finally:
            for s in socks:
                s.close()


def test_an_unreachable_database_at_start_gives_one_clear_line_and_exit_status_1():
    env = {**os.environ, "DATABASE_URL": "postgresql://someone:secret@127.0.0.1:1/newsletters", "PORT": str(free_port())}
    done = subprocess.run([sys.executable, os.path.join(HERE, "app.py")], env=env, capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach PostgreSQL" in lines[0] and "127.0.0.1:1/newsletters" in lines[0]
    assert "DATABASE_URL" in lines[0] and "docker compose up" in lines[0]


def test_the_schema_can_be_applied_again_and_by_two_processes_at_once(database):
    apps = []
    try:
        procs = [start_app(database.url) for _ in range(2)]  # each applies schema.sql at start
        apps.extend(procs)
        with listen(apps[0]) as one, listen(apps[1]) as two:
            one.ready(), two.ready()
            row = publish("Seen by both", app=apps[1])
            assert one.next()["data"] == row and two.next()["data"] == row
    finally:
        for a in apps:
            stop_app(a)


def test_sigterm_ends_the_app_cleanly_with_streams_open(database):
    app = start_app(database.url)
    try:
        with listen(app) as stream:
            stream.ready()
            started = time.time()
            assert stop_app(app) == 0
            assert time.time() - started < 5
    finally:
        stop_app(app)
