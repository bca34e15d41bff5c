"""Benchmark: many SSE clients, changes committed at a steady rate, latency measured per delivery.

    python bench.py                                         1,000 clients, 100 changes at 10/s
    python bench.py --clients 5000 --changes 100            5,000 clients, 50,000 deliveries/s
    python bench.py --clients 10000 --changes 1             one change to 10,000 clients
    python bench.py --clients 10000 --changes 0             idle streams: memory per client
    python bench.py --clients 10000 --changes 1 --resume    a resume storm: Last-Event-ID from all
    python bench.py --clients 10000 --changes 1 --resume-old  a storm of cursors older than the log
    python bench.py --clients 1000 --changes 1000 --rate 0  a burst: as fast as one writer can
    python bench.py --clients 10000 --workers 2             the storm, then 10/s, with WORKERS=2
    python bench.py --flood                                 the same, during a NOTIFY flood

It needs the same install as the tests (pip install -r requirements.txt: it borrows their servers
from test_app.py). It starts `python app.py` exactly as the tests do, on a private PostgreSQL, or
on TEST_DATABASE_URL or --dsn if given; with --url (and --dsn) it measures an app already running
(start that one with CLIENT_CONNECTIONS=0 CLIENT_CONNECTS=0: every client comes from one address).
It opens the clients from one separate process on non-blocking sockets, commits changes from
another, and prints one line per run. Each change carries the time it was committed (in its
title), so latency is commit to receipt. The line ends with the CPU the clients' process used:
when that nears the length of the run, the load generator, not the app, is what is measured. With
--workers N it starts the app with WORKERS=N, adds up memory and CPU over its workers, and says how
many streams each worker holds.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import re
import resource
import selectors
import socket
import sys
import time
from urllib.parse import urlsplit

import psycopg2

# the same servers the tests start
from test_app import start_app, start_postgres, stop_app, stop_postgres

# the commit time, in ns, that the writer put in the title (PostgreSQL's JSON may put a space
# before the colon)
STAMP = re.compile(rb'"title" ?: "bench (\d+) ')
READY = b"event: ready"


def raise_open_files_limit():
    """Let this process open as many sockets as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def clients(url, count, cursor, start_at, results, ready_at, writes_done):
    """One process, many sockets: connect them all, read every frame, note each change's latency."""
    expected = results["expected"]
    raise_open_files_limit()
    where = urlsplit(url)
    # the app's own host name (127.0.0.1 here): an app on loopback refuses other Host headers
    host = where.hostname.encode()
    request = b"GET /events HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n" % host
    if cursor is not None:
        request += b"Last-Event-ID: %d\r\n" % cursor
    request += b"\r\n"
    sel = selectors.DefaultSelector()
    tails = {}  # per socket: the start of a frame whose end has not arrived yet
    ready = set()  # sockets that have read `ready`
    latencies = []
    deadline = None
    while time.time() < start_at:
        time.sleep(0.01)
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((where.hostname, where.port))
        sel.register(s, selectors.EVENT_WRITE)
        tails[s] = b""
    while True:
        events = sel.select(timeout=1)
        now = time.time_ns()
        for key, mask in events:
            s = key.fileobj
            if mask & selectors.EVENT_WRITE:
                s.send(request)
                sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                # 64 KB, not more: recv(n) allocates n bytes first, and glibc may serve 1 MB with
                # mmap(), mremap() and munmap() on every call (15 us instead of 2, depending on
                # what the process allocated before), making this process the bottleneck.
                data = s.recv(1 << 16)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            data = tails[s] + data
            cut = data.rfind(b"\n\n") + 2  # whole frames only; the rest waits for the next read
            frames = data[:cut]
            tails[s] = data[cut:]
            if s not in ready and READY in frames:
                ready.add(s)
                frames = frames[frames.index(READY) :]  # the catch-up is not part of the latency
                if len(ready) == count:
                    ready_at.value = time.time()
            latencies.extend(now - int(t) for t in STAMP.findall(frames))
        # An Event in shared memory, not the manager's dict: asking the manager is a round trip
        # to another process, and this loop runs thousands of times a second.
        if ready_at.value and writes_done.is_set():
            if deadline is None:
                deadline = time.time() + 10
            if len(latencies) >= expected or time.time() > deadline:
                break
    results["latencies"] = latencies
    results["ready"] = len(ready)
    # Its own CPU: near the run's length, this process, not the app, limits what is measured.
    results["cpu"] = time.process_time()


def writer(dsn, changes, rate, size, start_at):
    """Commit `changes` newsletters at `rate` a second (0: as fast as one connection can)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    content = "x" * size
    while time.time() < start_at:
        time.sleep(0.005)
    for i in range(changes):
        if rate:
            time.sleep(max(0.0, start_at + i / rate - time.time()))
        title = f"bench {time.time_ns()} {i}"
        cur.execute("INSERT INTO newsletters (title, content) VALUES (%s, %s)", (title, content))
    conn.close()


def app_processes(pid):
    """The app's process and, with WORKERS, its workers: the children it forked."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(child) for child in f.read().split()]
    except OSError:
        return [pid]


def flood(dsn, stop, sent):
    """Send notifications on the app's channel, 10,000 a statement, until stop is set.

    Anyone who can connect may do this: NOTIFY needs no privilege.
    """
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    while not stop.is_set():
        cur.execute(
            "SELECT count(pg_notify('live_changes', g::text)) FROM generate_series(1, 10000) g"
        )
        with sent.get_lock():
            sent.value += 10_000
    conn.close()


def process_stats(pid):
    """(RSS in KB, CPU seconds) of the app, its workers added up; (0, 0) without a pid."""
    if not pid:
        return 0, 0
    rss = 0
    cpu = 0
    for each in app_processes(pid):
        with open(f"/proc/{each}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    rss += int(line.split()[1])
        with open(f"/proc/{each}/stat") as f:
            # the fields after the command name, which is in parentheses and may hold spaces
            fields = f.read().rsplit(")", 1)[1].split()
        user, system = int(fields[11]), int(fields[12])
        cpu += (user + system) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


def streams_per_worker(url, workers):
    """Open streams on each worker, by its /healthz (each answer is from one worker)."""
    where = urlsplit(url)
    counts = {}
    for _ in range(50 * workers):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            res = conn.getresponse()
            health = json.loads(res.read())
        finally:
            conn.close()
        # (503 from a worker whose listener is reconnecting: ask again.)
        if res.status == 200:
            counts[health["worker"]] = health["clients"]
        if len(counts) == workers:
            break
    return "/".join(str(counts.get(number, "?")) for number in range(1, workers + 1))


def db_stat(dsn, sql):
    """The one value a query returns."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def xacts(dsn):
    """Transactions committed in the database so far: the app runs each query in its own."""
    sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    return db_stat(dsn, sql)


def is_listener_read(statement):
    """Whether a logged statement is one of the app's reads of the changes after a version."""
    return statement.startswith("newsletter|") and "WHERE version > " in statement


def app_reads(log):
    """How many times the app has read changes, from PostgreSQL's statement log (private server).

    A statement of several lines is logged as it was written: its first line carries the log
    prefix (the application's name), the lines after it start with the statement's indentation.
    """
    statements = []
    with open(log, errors="replace") as f:
        for line in f:
            if line[:1].isspace() and statements:
                statements[-1] += line
            else:
                statements.append(line)
    return sum(1 for statement in statements if is_listener_read(statement))


def percentile(values, p):
    """The p-th percentile of sorted values (NaN for none)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def run(args, url, dsn, pid):
    """One measured run; returns the line to print."""
    manager = multiprocessing.Manager()
    results = manager.dict(expected=args.clients * args.changes)
    ready_at = multiprocessing.Value("d", 0.0)
    writes_done = multiprocessing.Event()
    cursor = None
    if args.resume or args.resume_old:
        cursor = db_stat(dsn, "SELECT coalesce(max(version), 0) FROM newsletters")
    if args.resume_old:
        # More changes after the cursor than the app's log holds (1,000): each client gets
        # "reset" and the newest page instead of a replay.
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO newsletters (title, content)"
                " SELECT 'old ' || i, 'x' FROM generate_series(1, 3000) AS i"
            )
        conn.close()
    time.sleep(1.5)  # let PostgreSQL's statistics settle before counting transactions
    rss0, _ = process_stats(pid)
    xacts0 = xacts(dsn)
    begin = time.time() + 0.2
    reader = multiprocessing.Process(
        target=clients, args=(url, args.clients, cursor, begin, results, ready_at, writes_done)
    )
    reader.start()
    while not ready_at.value and reader.is_alive() and time.time() < begin + 120:
        time.sleep(0.05)
    connect_s = float("nan")
    if ready_at.value:
        connect_s = ready_at.value - begin
    time.sleep(1)
    rss1, _ = process_stats(pid)
    spread = ""
    if args.workers > 1:
        spread = f", streams per worker {streams_per_worker(url, args.workers)}"
    time.sleep(11)  # an idle backend reports its statistics within 10 s
    storm_xacts = xacts(dsn) - xacts0 - 1  # includes the listener's own check every 5 s
    _, cpu0 = process_stats(pid)
    conns = db_stat(
        dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'newsletter'"
    )
    reads0 = 0
    if args.pg_log:
        reads0 = app_reads(args.pg_log)
    stop_flood = multiprocessing.Event()
    sent = multiprocessing.Value("q", 0)
    floods = []
    for _ in range(args.flood):
        floods.append(multiprocessing.Process(target=flood, args=(dsn, stop_flood, sent)))
        floods[-1].start()
    write = multiprocessing.Process(
        target=writer, args=(dsn, args.changes, args.rate, args.size, time.time() + 0.1)
    )
    write.start()
    write.join()
    stop_flood.set()
    for p in floods:
        p.join()
    writes_done.set()
    reader.join(timeout=120)
    _, cpu1 = process_stats(pid)
    reads = "?"
    if args.pg_log:
        reads = app_reads(args.pg_log) - reads0
    lat = sorted(ns / 1e6 for ns in results.get("latencies", []))
    rate = "burst"
    if args.rate:
        rate = args.rate
    flooded = ""
    if args.flood:
        flooded = f" | during a flood of {sent.value:,} notifications from {args.flood} sessions"
    return (
        f"workers={args.workers} clients={args.clients} changes={args.changes} rate={rate}"
        f" size={args.size}B"
        f" | delivered {len(lat)}/{results['expected']}"
        f" | latency ms p50={percentile(lat, 50):.0f} p95={percentile(lat, 95):.0f}"
        f" p99={percentile(lat, 99):.0f} max={percentile(lat, 100):.0f}"
        f" | all ready in {connect_s:.2f}s with {storm_xacts} db queries{spread}"
        f" | app {(rss1 - rss0) / max(args.clients, 1):.1f} KB/client, {conns} db conns,"
        f" {cpu1 - cpu0:.1f}s cpu and {reads} listener queries for the changes"
        f" | the clients' process {results.get('cpu', float('nan')):.1f}s cpu"
        f"{flooded}"
    )


def measure(args, dsn):
    """Start the app on dsn as the tests do, print one run's line, stop it."""
    # Every client comes from 127.0.0.1: no limit on connections per client address.
    app = start_app(dsn, WORKERS=str(args.workers), CLIENT_CONNECTIONS="0", CLIENT_CONNECTS="0")
    try:
        print(run(args, app.url, dsn, app.proc.pid))
    finally:
        stop_app(app)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10, help="changes a second; 0 for a burst")
    parser.add_argument("--size", type=int, default=200, help="bytes of content per change")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="clients connect with Last-Event-ID: the newest version",
    )
    parser.add_argument(
        "--resume-old",
        action="store_true",
        help="clients connect with a Last-Event-ID 3,000 changes old: older than the app's log",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="WORKERS for the app it starts, or the running one's"
    )
    parser.add_argument(
        "--flood",
        type=int,
        nargs="?",
        const=2,
        default=0,
        help="sessions that flood the channel with NOTIFY while the changes are written (2)",
    )
    parser.add_argument(
        "--url", help="a running app (then --dsn too): its database must be the one it uses"
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("TEST_DATABASE_URL"),
        help="the app's database (default: TEST_DATABASE_URL; unset: a private PostgreSQL)",
    )
    parser.add_argument(
        "--pid", type=int, help="with --url: the app's process id, for memory and CPU figures"
    )
    args = parser.parse_args()
    raise_open_files_limit()
    args.pg_log = None  # the statement log is read only on the private server
    if args.url:
        if not args.dsn:
            parser.error("--url needs --dsn (or TEST_DATABASE_URL): the database the app uses")
        print(run(args, args.url, args.dsn, args.pid))
        return
    if args.dsn:
        measure(args, args.dsn)
        return
    try:
        pg = start_postgres("-c log_statement=all -c log_line_prefix='%a|'")
    except (LookupError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    try:
        args.pg_log = pg.log
        measure(args, pg.url)
    finally:
        stop_postgres(pg)


if __name__ == "__main__":
    main()
