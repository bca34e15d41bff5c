"""Benchmark: many SSE clients, changes committed at a steady rate, latency measured per delivery.

    python bench.py                                   1,000 clients, 100 changes at 10/s (under a minute)
    python bench.py --clients 5000 --changes 300      5,000 clients, 50,000 deliveries a second
    python bench.py --clients 10000 --changes 1       one change to 10,000 clients
    python bench.py --clients 10000 --changes 0       idle streams: memory per client
    python bench.py --clients 1000 --changes 1000 --rate 0     a burst: every change as fast as one writer can
    python bench.py --clients 10000 --resume --changes 1       a resume storm: every client sends Last-Event-ID

It starts a private PostgreSQL and `python app.py` exactly as the tests do (or uses --url and --dsn), opens
the clients from one separate process on non-blocking sockets, commits changes from another, and prints one
line per run. Each change carries the time it was committed (in its title), so latency is commit to receipt.
"""
import argparse, multiprocessing, os, re, resource, selectors, socket, statistics, sys, time
from urllib.parse import urlsplit

import psycopg2

from test_app import postgres, start_app, stop_app  # the same servers the tests start

STAMP = re.compile(rb"\"title\": \"bench (\d+) (\d+)")
READY = b"event: ready"


def clients(url, count, cursor, start_at, results, ready_at):
    """One process, many sockets: connect them all, read every frame, note each change's latency."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    request = b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
    request += b"Last-Event-ID: %d\r\n\r\n" % cursor if cursor is not None else b"\r\n"
    sel, tails, ready, latencies, deadline = selectors.DefaultSelector(), {}, set(), [], None
    while time.time() < start_at:
        time.sleep(0.01)
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
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
                data = s.recv(1 << 20)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            data = tails[s] + data
            cut = data.rfind(b"\n\n") + 2  # whole frames only; the rest waits for the next read
            frames, tails[s] = data[:cut], data[cut:]
            if s not in ready and READY in frames:
                ready.add(s)
                frames = frames[frames.index(READY):]  # the catch-up is not part of the latency
                if len(ready) == count:
                    ready_at.value = time.time()
            latencies.extend((int(i), now - int(t)) for t, i in STAMP.findall(frames))
        if ready_at.value and results.get("stop"):
            deadline = deadline or time.time() + 10
            if len(latencies) >= results["expected"] or time.time() > deadline:
                break
    results["latencies"] = latencies
    results["ready"] = len(ready)


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
        cur.execute("INSERT INTO newsletters (title, content) VALUES (%s, %s)", (f"bench {time.time_ns()} {i}", content))
    conn.close()


def process_stats(pid):
    """(RSS in KB, CPU seconds) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(next(line for line in f if line.startswith("VmRSS")).split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def db_stat(dsn, sql):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def xacts(dsn):
    """Transactions committed in the database so far: the app runs each query in its own."""
    return db_stat(dsn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")


def app_reads(log):
    """How many times the app has read changes, from PostgreSQL's statement log (private server only)."""
    with open(log, errors="replace") as f:
        return sum(1 for line in f if line.startswith("newsletter|") and "WHERE version > " in line)


def run(args, url, dsn, pid):
    """One measured run; returns the line to print."""
    manager = multiprocessing.Manager()
    results, ready_at = manager.dict(expected=args.clients * args.changes), multiprocessing.Value("d", 0.0)
    cursor = db_stat(dsn, "SELECT coalesce(max(version), 0) FROM newsletters") if args.resume else None
    time.sleep(1.5)  # let PostgreSQL's statistics settle before counting transactions
    rss0, _ = process_stats(pid) if pid else (0, 0)
    xacts0, begin = xacts(dsn), time.time() + 0.2
    reader = multiprocessing.Process(target=clients, args=(url, args.clients, cursor, begin, results, ready_at))
    reader.start()
    while not ready_at.value and reader.is_alive() and time.time() < begin + 120:
        time.sleep(0.05)
    connect_s = ready_at.value - begin if ready_at.value else float("nan")
    time.sleep(1)
    rss1, _ = process_stats(pid) if pid else (0, 0)
    time.sleep(11)  # an idle backend reports its statistics within 10 s
    storm_xacts = xacts(dsn) - xacts0 - 1  # includes the listener's own check every 5 s
    _, cpu0 = process_stats(pid) if pid else (0, 0)
    conns = db_stat(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'newsletter'")
    reads0 = app_reads(args.pg_log) if args.pg_log else 0
    write = multiprocessing.Process(target=writer, args=(dsn, args.changes, args.rate, args.size, time.time() + 0.1))
    write.start()
    write.join()
    results["stop"] = True
    reader.join(timeout=120)
    _, cpu1 = process_stats(pid) if pid else (0, 0)
    reads = app_reads(args.pg_log) - reads0 if args.pg_log else "?"
    import pickle; pickle.dump(list(results.get("latencies", [])), open("/tmp/lat.pkl","wb")); lat = sorted(ms / 1e6 for _, ms in results.get("latencies", []))
    pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")
    return (f"clients={args.clients} changes={args.changes} rate={args.rate or 'burst'} size={args.size}B"
            f" | delivered {len(lat)}/{results['expected']}"
            f" | latency ms p50={pct(50):.0f} p95={pct(95):.0f} p99={pct(99):.0f} max={lat[-1] if lat else float('nan'):.0f}"
            f" | all ready in {connect_s:.2f}s with {storm_xacts} db queries"
            f" | app {(rss1 - rss0) / max(args.clients, 1):.1f} KB/client, {conns} db conns,"
            f" {cpu1 - cpu0:.1f}s cpu and {reads} listener queries for the changes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10, help="changes a second; 0 for a burst")
    parser.add_argument("--size", type=int, default=200, help="bytes of content per change")
    parser.add_argument("--resume", action="store_true", help="clients connect with Last-Event-ID: the newest version")
    parser.add_argument("--url", help="a running app (then --dsn too): its database must be the one it uses")
    parser.add_argument("--dsn", help="the app's database, for the writer")
    parser.add_argument("--pid", type=int, help="with --url: the app's process id, for memory and CPU figures")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    if args.url:
        args.pg_log = None
        print(run(args, args.url, args.dsn, args.pid))
        return
    with postgres("-c log_statement=all -c log_line_prefix='%a|'") as pg:
        args.pg_log = pg.log
        app = start_app(pg.url)
        try:
            print(run(args, app.url, pg.url, app.proc.pid))
        finally:
            stop_app(app)


if __name__ == "__main__":
    main()
