"""Run the benchmark: the gateway beside bare Flask, the pipeline beside no-op chains.

Everything runs on 127.0.0.1: two gunicorns (the gateway and bare Flask, one
configuration), the Procfile's worker pools, the same pools' flags on four no-op
tasks, the fake GitHub, and a PostgreSQL database created and dropped here (or
SQLite). Redis database 8 holds the broker, claims and tokens, 9 the broker with
--separate-broker; both are EMPTIED at start and end. HOOKLINE_BENCH_REDIS_URL and
HOOKLINE_BENCH_BROKER_URL name others.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import requests
from sqlalchemy import text

from bench import noop_app
from bench.delivery import Deliveries, large_body
from bench.load import Client, LoadResult, drive
from bench.processes import (
    ROOT,
    CpuMeter,
    Process,
    ProcessTree,
    peak_rss_mb,
    procfile_command,
    reset_peak_rss,
    rss_mb,
    start,
    wait_until,
    with_option,
)
from bench.report import write_report
from config.settings import load_settings
from hookline.devtools import free_port, generate_app_key

# One database for the broker and the claims, as when CELERY_BROKER_URL is unset;
# --separate-broker moves the broker to database 9. Both are emptied at start and
# end: two benches at once (or the smoke test beside a bench) need other numbers.
REDIS_URL = os.environ.get("HOOKLINE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
SEPARATE_BROKER_URL = os.environ.get(
    "HOOKLINE_BENCH_BROKER_URL", "redis://127.0.0.1:6379/9"
)
ADMIN_DATABASE_URL = os.environ.get(
    "HOOKLINE_BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
APP_ID = "271828"
POOLS = ("classify", "conversations", "agent", "callbacks")
CLASSIFY_QUEUE = "classify"
WORKDIR = Path(os.environ.get("HOOKLINE_BENCH_WORKDIR", ROOT / "var" / "bench"))
MIB = 1024 * 1024


@dataclass
class Options:
    """How much to run; `python -m bench --help` explains each."""

    deliveries: int
    concurrency: int
    rounds: int
    seconds: float
    max_requests: int
    large_body_mb: float
    database: str
    out: Path
    timeout: float
    broker_url: str


def parse_options(argv: list[str] | None) -> Options:
    """Read the command line; --smoke shrinks every size for the test suite."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--deliveries", type=int, default=1000, help="pipeline jobs")
    parser.add_argument("--concurrency", type=int, default=16, help="open requests")
    parser.add_argument("--rounds", type=int, default=5, help="gateway/bare rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="each round's cap")
    parser.add_argument(
        "--max-requests", type=int, default=30_000, help="each round's request cap"
    )
    parser.add_argument("--large-body-mb", type=float, default=25.0)
    parser.add_argument(
        "--database",
        choices=("auto", "postgresql", "sqlite"),
        default="auto",
        help="auto: PostgreSQL if it answers, else SQLite",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench", help="where results go"
    )
    parser.add_argument(
        "--timeout", type=float, default=240, help="longest wait for the pipeline"
    )
    parser.add_argument(
        "--separate-broker",
        action="store_true",
        help="broker in Redis database 9, apart from the claims (as with RabbitMQ)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few deliveries: proves it runs"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.deliveries, args.rounds, args.seconds = 3, 1, 1.0
        args.max_requests, args.large_body_mb = 40, 1.0
        args.concurrency = min(args.concurrency, 4)
    return Options(
        deliveries=args.deliveries,
        concurrency=args.concurrency,
        rounds=args.rounds,
        seconds=args.seconds,
        max_requests=args.max_requests,
        large_body_mb=args.large_body_mb,
        database=args.database,
        out=args.out,
        timeout=args.timeout,
        broker_url=SEPARATE_BROKER_URL if args.separate_broker else REDIS_URL,
    )


# Services


def _redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        raise SystemExit(f"Redis is not answering at {url}; start it first.") from None
    return client


def _postgres_answers() -> bool:
    import psycopg2

    try:
        psycopg2.connect(ADMIN_DATABASE_URL, connect_timeout=2).close()
    except psycopg2.Error:
        return False
    return True


@contextmanager
def bench_database(kind: str) -> Iterator[tuple[str, str]]:
    """Yield a migrated database URL and its kind; drop it afterwards."""
    if kind == "auto":
        kind = "postgresql" if _postgres_answers() else "sqlite"
    if kind == "sqlite":
        path = WORKDIR / "bench.sqlite3"
        for leftover in WORKDIR.glob("bench.sqlite3*"):
            leftover.unlink()
        url = f"sqlite:///{path}"
        _migrate(url)
        yield url, "sqlite"
        return

    import psycopg2
    from sqlalchemy.engine import make_url

    admin = psycopg2.connect(ADMIN_DATABASE_URL, connect_timeout=5)
    admin.autocommit = True
    # Named by start time: another bench running beside this one keeps its own.
    name = f"hookline_bench_{int(time.time())}_{uuid.uuid4().hex[:6]}"
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            ["hookline_bench_%"],
        )
        for (leftover,) in cursor.fetchall():
            if _abandoned(leftover):
                with contextlib.suppress(psycopg2.Error):
                    cursor.execute(f'DROP DATABASE "{leftover}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_DATABASE_URL).set(database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        _migrate(rendered)
        yield rendered, "postgresql"
    finally:
        from hookline.db import engine_for

        engine_for(rendered).dispose()
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _abandoned(name: str, older_than: float = 6 * 3600) -> bool:
    """Whether a bench database was left by a run that started hours ago."""
    started = name.removeprefix("hookline_bench_").split("_")[0]
    # Names without a start time come from before it was part of the name.
    return not started.isdigit() or time.time() - int(started) > older_than


def _migrate(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", database_url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


@contextmanager
def fake_github(logs: Path) -> Iterator[tuple[str, Process, Path]]:
    """Run the fake GitHub in a process of its own; yield its URL and key path."""
    key_path, public_key = generate_app_key(WORKDIR)
    public_path = WORKDIR / "github-app.pub.pem"
    public_path.write_bytes(public_key)
    port = free_port()
    process = start(
        "fake_github",
        [
            *("gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1"),
            *("--worker-class", "gthread", "--threads", "8"),
            "bench.fake_wsgi:app",
        ],
        {"BENCH_FAKE_APP_ID": APP_ID, "BENCH_FAKE_PUBLIC_KEY": str(public_path)},
        logs,
    )
    try:
        _wait_for_port(port, process, 30)
        yield f"http://127.0.0.1:{port}", process, key_path
    finally:
        process.stop()


def _wait_for_port(port: int, process: Process, timeout: float) -> None:
    def answers() -> bool:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log_text()[-2000:]}")
        with socket.socket() as probe:
            probe.settimeout(0.5)
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until(answers, timeout, f"{process.name} listening on {port}")


# The stack


def start_gunicorn(
    name: str, app: str, env: dict[str, str], logs: Path
) -> tuple[ProcessTree, int]:
    """Start the Procfile's web command serving `app`; wait until it answers."""
    port = free_port()
    env = {**env, "PORT": str(port), "WEB_HOST": "127.0.0.1"}
    args = procfile_command("web", env)
    args = [app if arg == "webhook_gateway.wsgi:app" else arg for arg in args]
    process = start(name, args, env, logs)
    _wait_for_port(port, process, 60)
    client = Client("127.0.0.1", port, 10)
    wait_until(
        lambda: client.send(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")[0] > 0,
        30,
        f"{name} answering",
    )
    client.close()
    return ProcessTree(process), port


def start_pools(env: dict[str, str], logs: Path, noop: bool) -> dict[str, ProcessTree]:
    """Start one worker per pool with the Procfile's flags (on no-op tasks if asked)."""
    trees = {}
    for index, pool in enumerate(POOLS):
        args = procfile_command(pool, env)
        name = pool
        if noop:
            name = f"noop-{pool}"
            args = with_option(args, "-A", "bench.noop_app")
            args = with_option(args, "-Q", noop_app.QUEUES[index])
            args = with_option(args, "-n", f"bench-noop-{index + 1}@%h")
        trees[pool] = ProcessTree(start(name, args, env, logs))
    for tree in trees.values():
        wait_until(
            lambda tree=tree: _ready(tree.process), 90, f"{tree.process.name} ready"
        )
    return trees


def _ready(process: Process) -> bool:
    if process.popen.poll() is not None:
        raise RuntimeError(f"{process.name} exited:\n{process.log_text()[-2000:]}")
    return " ready." in process.log_text()


def stop_all(trees: dict[str, ProcessTree]) -> None:
    """Stop the processes, each with its children."""
    for tree in trees.values():
        tree.process.stop()


def poll(predicate: Callable[[], bool], deadline: float) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `deadline` passes."""
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# Counting what reached the broker


def queued_delivery_ids(broker: redis.Redis, queue: str) -> list[str]:
    """Return the delivery id of each message in a queue, then empty the queue."""
    ids = []
    keys = [key for key in broker.keys(f"{queue}*") if not key.startswith(b"_kombu")]
    for key in keys:
        length = broker.llen(key)
        for offset in range(0, length, 1000):
            for raw in broker.lrange(key, offset, offset + 999):
                message = json.loads(raw)
                body = base64.b64decode(message["body"])
                ids.append(json.loads(body)[1]["delivery_id"])
        broker.delete(key)
    return ids


def count_outcome(accepted: list[str], found: list[str]) -> dict[str, int]:
    """Compare the deliveries answered 202 with what arrived; count losses."""
    seen = Counter(found)
    accepted_set = set(accepted)
    return {
        "accepted": len(accepted),
        "arrived": len(found),
        "lost": len(accepted_set - seen.keys()),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "unexpected": len(seen.keys() - accepted_set),
    }


# Phase 1: the gateway beside bare Flask


def gateway_phase(
    options: Options,
    env: dict[str, str],
    logs: Path,
    broker: redis.Redis,
    deliveries: Deliveries,
    gateway: ProcessTree,
    gateway_port: int,
) -> dict[str, object]:
    """Drive bare Flask and the gateway in alternating rounds; count every delivery."""
    bare, bare_port = start_gunicorn("bare", "bench.bare_app:app", env, logs)
    rest = {"gateway": gateway.rss(), "bare": bare.rss()}
    targets = {"bare": (bare_port, 200), "gateway": (gateway_port, 202)}
    trees = {"gateway": gateway, "bare": bare}
    sequence = 0
    rounds = []
    counts = Counter()
    # CPU milliseconds per answered request, summed over the measured rounds.
    cpu: dict[str, Counter[str]] = {target: Counter() for target in targets}
    answered = Counter()

    def run(
        target: str, requests_cap: int, seconds: float, measured: bool = False
    ) -> LoadResult:
        nonlocal sequence
        port, accepted_status = targets[target]
        offset = sequence
        sequence += requests_cap
        meter = CpuMeter({target: trees[target]}, {"load_generator": os.getpid()})
        meter.start()
        result = drive(
            "127.0.0.1",
            port,
            lambda n: deliveries.make(offset + n),
            options.concurrency,
            seconds,
            requests_cap,
            accepted_status,
        )
        if measured:
            cpu[target].update(meter.read())
            answered[target] += result.sent
        if target == "gateway":
            outcome = count_outcome(
                result.accepted, queued_delivery_ids(broker, CLASSIFY_QUEUE)
            )
            counts.update(outcome)
        return result

    try:
        for target in targets:
            run(target, min(300, options.max_requests), 5)
        for number in range(options.rounds):
            # Alternate which goes first, so drift in the machine's load cancels.
            order = ["bare", "gateway"] if number % 2 == 0 else ["gateway", "bare"]
            measured = {
                target: run(target, options.max_requests, options.seconds, True)
                for target in order
            }
            rounds.append(
                {target: measured[target].summary() for target in ("bare", "gateway")}
            )
        after = {"gateway": gateway.rss(), "bare": bare.rss()}
        large = large_body_phase(options, gateway, gateway_port, deliveries, broker)
    finally:
        bare.process.stop()
    return {
        "rounds": rounds,
        "cpu_ms_per_request": {
            target: {
                name: round(seconds * 1000 / max(answered[target], 1), 3)
                for name, seconds in spent.items()
            }
            for target, spent in cpu.items()
        },
        "delivery_counts": dict(counts),
        "rss_mb": {"at_rest": rest, "after_run": after},
        "large_body": large,
    }


def large_body_phase(
    options: Options,
    gateway: ProcessTree,
    port: int,
    deliveries: Deliveries,
    broker: redis.Redis,
) -> dict[str, object]:
    """Send one large delivery; report its answer and each worker's memory growth."""
    size = int(options.large_body_mb * MIB)
    delivery = deliveries.sign("push", large_body(size, secrets.token_hex(8)))
    workers = {role: pid for role, pid in gateway.pids().items() if role != "main"}
    before = {role: rss_mb(pid) for role, pid in workers.items()}
    peak_reset = all(reset_peak_rss(pid) for pid in workers.values())
    client = Client("127.0.0.1", port, 60)
    started = time.perf_counter()
    try:
        status, _ = client.send(delivery.request(f"127.0.0.1:{port}"))
    finally:
        client.close()
    seconds = time.perf_counter() - started
    peaks = {role: peak_rss_mb(pid) for role, pid in workers.items()}
    growth = max(peaks[role] - before[role] for role in workers)
    found = queued_delivery_ids(broker, CLASSIFY_QUEUE)
    return {
        "bytes": size,
        "status": status,
        "seconds": round(seconds, 3),
        "rss_before_mb": before,
        "peak_rss_mb": peaks,
        "peak_measured": "VmHWM after reset" if peak_reset else "VmHWM since start",
        "growth_mb": round(growth, 1),
        "growth_ratio": round(growth * MIB / size, 2),
        "queued": found.count(delivery.delivery_id),
    }


# Phase 2 and 3: no-op chains, then the pipeline


def noop_phase(
    options: Options, env: dict[str, str], logs: Path, store: redis.Redis
) -> dict[str, object]:
    """Run N chains of four no-op hops on the pools' own flags; time them."""
    trees = start_pools(env, logs, noop=True)
    store.delete(noop_app.DONE_COUNT, noop_app.DONE_AT)
    body = Deliveries("unused").make(0).body.decode()
    publisher = noop_app.make_app(load_settings(env), publisher=True)
    meter = CpuMeter(trees, {"bench_driver": os.getpid()})
    meter.start()
    try:
        started = time.monotonic()
        for number in range(options.deliveries):
            noop_app.start_chain(publisher, f"chain-{number}", body)
        timed_out = not poll(
            lambda: int(store.get(noop_app.DONE_COUNT) or 0) >= options.deliveries,
            started + options.timeout,
        )
        last = store.zrange(noop_app.DONE_AT, -1, -1, withscores=True)
        finished = last[0][1] if last else time.monotonic()
        time.sleep(0.5)  # a duplicate would arrive late: give it a moment
        done = int(store.get(noop_app.DONE_COUNT) or 0)
        unique = store.zcard(noop_app.DONE_AT)
        cpu = meter.read()
    finally:
        stop_all(trees)
    return {
        "chains": options.deliveries,
        "timed_out": timed_out,
        "seconds": round(finished - started, 3),
        "finished": unique,
        "lost": options.deliveries - unique,
        "duplicated": done - unique,
        "cpu_seconds": cpu,
    }


def pipeline_phase(
    options: Options,
    env: dict[str, str],
    logs: Path,
    deliveries: Deliveries,
    gateway: ProcessTree,
    gateway_port: int,
    fake: tuple[str, Process],
    database_url: str,
) -> dict[str, object]:
    """Send N triggering deliveries through the whole stack; time the last comment."""
    from hookline.db import engine_for
    from hookline.models import utcnow

    fake_url, fake_process = fake
    trees = start_pools(env, logs, noop=False)
    rest = {pool: tree.rss() for pool, tree in trees.items()}
    engine = engine_for(database_url)
    meter = CpuMeter(
        {"gateway": gateway, **trees, "fake_github": ProcessTree(fake_process)},
        {"bench_driver": os.getpid()},
    )
    meter.start()
    # Far from the gateway phase's numbers, so issue numbers never repeat.
    offset = 5_000_000
    # The gateway phase left its deliveries in the inbox, never classified.
    began = utcnow()
    try:
        started = time.monotonic()
        sent = drive(
            "127.0.0.1",
            gateway_port,
            lambda n: deliveries.make(offset + n),
            options.concurrency,
            options.timeout,
            options.deliveries,
        )

        def settled() -> bool:
            with engine.connect() as connection:
                done = connection.execute(
                    text("SELECT count(*) FROM callbacks WHERE status <> 'pending'")
                ).scalar_one()
            return done >= len(sent.accepted)

        timed_out = not poll(settled, started + options.timeout)
        time.sleep(0.5)  # a duplicate comment would arrive late: give it a moment
        cpu = meter.read()
        after = {pool: tree.rss() for pool, tree in trees.items()}
        after["gateway"] = gateway.rss()
        posted = requests.get(
            f"{fake_url}/_fake/requests",
            params={"method": "POST", "path_contains": "/comments"},
            timeout=30,
        ).json()
        with engine.connect() as connection:
            verdicts = dict(
                connection.execute(
                    text(
                        "SELECT verdict, count(*) FROM deliveries"
                        " WHERE created_at >= :began GROUP BY verdict"
                    ),
                    {"began": began},
                ).all()
            )
            callbacks = dict(
                connection.execute(
                    text("SELECT status, count(*) FROM callbacks GROUP BY status")
                ).all()
            )
    finally:
        stop_all(trees)

    comments = [
        entry
        for entry in posted
        if entry["status"] == 201 and entry["path"].endswith("/comments")
    ]
    per_issue = Counter(int(entry["path"].split("/")[-2]) for entry in comments)
    expected = {offset + 1_000_000 + n for n in range(options.deliveries)}
    last = max((entry["received_at"] for entry in comments), default=started)
    return {
        "deliveries": options.deliveries,
        "timed_out": timed_out,
        "answers": {str(status): n for status, n in sent.statuses.items()},
        "errors": dict(sent.errors),
        "seconds": round(last - started, 3),
        "sending_seconds": round(sent.seconds, 3),
        "comments": len(comments),
        "lost": len(expected - per_issue.keys()),
        "duplicated": sum(n - 1 for n in per_issue.values() if n > 1),
        "verdicts": verdicts,
        "callbacks": callbacks,
        "cpu_seconds": cpu,
        "rss_mb": {"at_rest": rest, "after_run": after},
    }


# Putting it together


def environment(
    fake_url: str, key_path: Path, database_url: str, secret: str, broker_url: str
) -> dict[str, str]:
    """Return the settings every process of the stack runs with."""
    return {
        "GITHUB_APP_WEBHOOK_SECRET": secret,
        "GITHUB_APP_ID": APP_ID,
        "GITHUB_APP_PRIVATE_KEY_PATH": str(key_path),
        "GITHUB_API_URL": fake_url,
        "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": broker_url,
        "CELERY_BROKER_KEYPREFIX": "",
        "HOOKLINE_REDIS_PREFIX": "hookline:",
        "DATABASE_URL": database_url,
        # The no-op agent: the command runner posts its (empty) stdout.
        "HOOKLINE_AGENT_COMMAND": shutil.which("true") or "/bin/true",
        "HOOKLINE_GITHUB_TIMEOUT": "10",
    }


def run(options: Options) -> dict[str, object]:
    """Run every phase; return the results."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    logs = WORKDIR / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    broker, store = _redis(options.broker_url), _redis(REDIS_URL)
    broker.flushdb()
    store.flushdb()
    secret = secrets.token_hex(20)
    deliveries = Deliveries(secret)
    began = time.monotonic()

    with (
        bench_database(options.database) as (database_url, database_kind),
        fake_github(logs) as (fake_url, fake_process, key_path),
    ):
        env = environment(fake_url, key_path, database_url, secret, options.broker_url)
        gateway, gateway_port = start_gunicorn(
            "gateway", "webhook_gateway.wsgi:app", env, logs
        )
        try:
            print("gateway and bare Flask ...", flush=True)
            web = gateway_phase(
                options, env, logs, broker, deliveries, gateway, gateway_port
            )
            print("no-op chains ...", flush=True)
            noop = noop_phase(options, env, logs, store)
            print("pipeline ...", flush=True)
            pipeline = pipeline_phase(
                options,
                env,
                logs,
                deliveries,
                gateway,
                gateway_port,
                (fake_url, fake_process),
                database_url,
            )
        finally:
            gateway.process.stop()
    broker.flushdb()
    store.flushdb()

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "database": database_kind,
        "broker": "separate" if options.broker_url != REDIS_URL else "claims' Redis",
        "web": {
            name: env_value
            for name in ("WEB_CONCURRENCY", "WEB_THREADS")
            if (env_value := os.environ.get(name))
        },
        "procfile": {
            name: " ".join(procfile_command(name, os.environ))
            for name in ("web", *POOLS)
        },
        "options": {
            "deliveries": options.deliveries,
            "concurrency": options.concurrency,
            "rounds": options.rounds,
            "seconds": options.seconds,
            "delivery_bytes": len(deliveries.make(0).body),
            "large_body_bytes": int(options.large_body_mb * MIB),
        },
        "gateway_vs_bare": web,
        "noop_chains": noop,
        "pipeline": pipeline,
        "wall_seconds": round(time.monotonic() - began, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the bench, write results.json and RESULTS.md, print the ratios."""
    options = parse_options(argv)
    # SIGTERM (a timeout, a cancelled job) unwinds like Ctrl-C, so each process the
    # bench started is stopped by its `finally` instead of being left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        results = run(options)
    except KeyboardInterrupt:
        print("interrupted: the processes the bench started are stopped", flush=True)
        return 130
    options.out.mkdir(parents=True, exist_ok=True)
    table, missed = write_report(results, options.out)
    print(f"\n{table}\n")
    print(f"missed: {'; '.join(missed)}" if missed else "every target met")
    print(f"results: {options.out / 'results.json'}, {options.out / 'RESULTS.md'}")
    # Missing a target is a finding, not a failure of the bench.
    return 0
