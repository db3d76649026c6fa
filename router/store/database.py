"""The database: connections, migrations, and the one way writes reach it.

Reads go through `self._reader` (an aiosqlite connection). Every write goes through the one
writer (router/store/writer.py), as a job: a plain function that takes the writer's
`sqlite3.Connection`, runs its statements and returns what the caller needs::

    def topup(db: sqlite3.Connection) -> int:
        return db.execute("INSERT INTO ledger ... RETURNING id", args).fetchone()[0]

    ledger_id = await self.write(topup)

The job's statements are atomic together (a savepoint of their own), committed with whatever
else was queued meanwhile (group commit: one fsync for many callers), and `write` answers only
after that commit. A job that raises changes nothing and its caller gets the exception (an
IntegrityError from a CHECK, a UNIQUE index or a trigger is how the schema refuses). A job
runs in the writer's thread: it never awaits, never begins, commits or rolls back, and fetches
what its statements return before it returns. Nothing writes any other way.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Self, TypeVar, overload
from urllib.parse import quote

import aiosqlite
import structlog

from router.store.records import Order
from router.store.writer import Job, Statement, Writer

T = TypeVar("T")
SqlTrace = Callable[[str], object]  # called with each statement run, values filled in

log = structlog.get_logger("router.store")

CALL_RETENTION_SECONDS: Final = 30 * 24 * 3600.0
_BALANCE_CHECK: Final = "CHECK constraint failed: balance"  # resellers.balance >= 0 (0001)
BUSY_TIMEOUT_MS: Final = 10_000  # a statement's wait for the write lock (Store.open's default)
# The hot reads' connection (Database._read_now) maps the database file (SQLite caps this at
# its build's maximum, 0x7fff0000 in the usual builds): pages are read in place, without a copy
# or a system call, and stay mapped across other connections' commits, which empty a WAL
# reader's page cache. 2 GiB is the whole file up to about 4M orders as tests/bench_fill.py
# makes them (530 MB a million with their attempts, ledger rows and calls, of which 43 MB is
# the status index orders_status; 10M orders: about 5.3 GB, 430 MB of it that index).
HOT_MMAP_BYTES: Final = 2 * 1024**3
# Its page cache (SQLite's default: 2 MB) holds what the map does not: WAL pages, and the pages
# past the map's end in a bigger file, such as the status index of about 400k orders.
# The other connections keep the default: the sync and the reports read wide ranges, and
# whatever a cache holds stays in the process (the sync's RSS bound is 200 MB).
HOT_CACHE_KIB: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class WriteRetry:
    """How a write that must land (an order's settle: the upstream may hold the order) is
    retried on an error that may pass (the database locked past the busy timeout, an I/O error,
    a full disk): after `first` seconds, doubling up to `longest`, until `give_up_after` seconds
    have passed. Each try also waits up to the busy timeout for the lock."""

    first: float = 0.05
    longest: float = 5.0
    give_up_after: float = 3600.0


SETTLE_RETRY: Final = WriteRetry()  # Store.open's default


class StoreError(Exception):
    """A domain rule the database refused (unknown reseller, balance below zero, ...)."""


class DuplicateRequest(StoreError):
    """The reseller already made an order with this request ID: `first` is that order."""

    def __init__(self, first: Order) -> None:
        super().__init__(f"request ID already used by order {first.id}")
        self.first = first


class UpstreamOrderTaken(StoreError):
    """An upstream order that another local order already holds: nothing was stored.

    The database has one local order per (provider, upstream order): a second one would be a
    second charge for one delivery (or an upstream that reuses its IDs).
    """

    def __init__(self, provider: str, upstream_order: int, holder: int | None) -> None:
        held_by = f"order {holder}" if holder is not None else "another order"
        super().__init__(
            f"upstream order {upstream_order} at {provider} already belongs to {held_by}"
        )
        self.provider = provider
        self.upstream_order = upstream_order
        self.holder = holder


class NotStored(StoreError):
    """A write that must land could not be stored within its WriteRetry."""


class DatabaseUnavailable(StoreError):
    """The database file cannot be opened or created: `reason` says why, `fix` what to do
    about it on this machine (the command line adds which setting points here)."""

    def __init__(self, path: Path, cause: OSError | sqlite3.Error) -> None:
        self.path = path = path.absolute()  # once, on the way out: a blocking call is fine
        self.cause = cause
        folder = path.parent
        blocking = next((p for p in (*reversed(folder.parents), folder) if p.is_file()), None)
        self.fix: str | None = f"make {folder} a folder this user can write"
        if blocking is not None:
            self.reason = f"{blocking} is a file, not a folder"
            self.fix = None  # that file is someone's: only another path helps
        elif isinstance(cause, OSError):
            why = (cause.strerror or str(cause)).lower()
            self.reason = f"cannot create {cause.filename or folder}: {why}"
        elif path.is_dir():
            self.reason = f"{path} is a folder, not a file"
            self.fix = None  # only another path helps
        elif isinstance(cause, sqlite3.DatabaseError) and "not a database" in str(cause):
            self.reason = f"{path} is not an SQLite database"
            self.fix = f"move {path} away"
        elif not os.access(folder, os.W_OK):
            self.reason = f"{folder} is not writable by this user"
        elif path.exists() and not os.access(path, os.W_OK):
            self.reason = f"{path} is not writable by this user"
            self.fix = f"make {path} writable by this user"
        else:
            self.reason = str(cause)
        super().__init__(f"cannot open the database {path}: {self.reason}")


_INCARNATION: Final = secrets.token_hex(4)  # tells this process from an earlier one with its PID


def process_owner() -> str:
    """This process, as the `placing_by` of the orders it places: "host:pid:incarnation"."""
    return f"{socket.gethostname()}:{os.getpid()}:{_INCARNATION}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that wrote `placing_by` may still be placing the order.

    Known only on this host: another host's process counts as alive (the staleness bound in
    `hold_interrupted_orders` settles it); an order from before owners were recorded does not.
    A restarted container often gets its old PID (and host name) back: the incarnation tells.
    """
    host, pid_text, incarnation = [*(owner or "").split(":"), "", "", ""][:3]
    if not owner or not pid_text.isdecimal():
        return False
    if host != socket.gethostname():
        return True
    if int(pid_text) == os.getpid():
        return incarnation == _INCARNATION
    try:
        os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class Database:
    """The router's SQLite database. Open with `await Store.open(path)`."""

    # The hot reads' connection, on the event loop (`_read_now`); None: read through _reader.
    _hot: sqlite3.Connection | None = None

    def __init__(
        self,
        writer: Writer | None,
        reader: aiosqlite.Connection,
        *,
        settle_retry: WriteRetry | None = None,
    ) -> None:
        self._writer = writer  # every write; None for a read-only store
        self._reader = reader
        self._settle_retry = settle_retry or SETTLE_RETRY
        self.owner = process_owner()  # written on the orders this process is placing

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        busy_timeout_ms: int | None = None,
        settle_retry: WriteRetry | None = None,
        read_only: bool = False,
        trace: SqlTrace | None = None,
    ) -> Self:
        """Connect, switch to WAL, apply pending migrations; DatabaseUnavailable if it cannot.

        `busy_timeout_ms` (default BUSY_TIMEOUT_MS) and `settle_retry` (default SETTLE_RETRY)
        are read when the store opens: tests that lock the database shorten them.
        `read_only`: one read-only connection, no writer, no migration; an existing database
        is read as it is and never changed (`smm-router check`). `trace` sees every statement
        the store runs (the writer's on this event loop), with its values, from the first one
        on (tests EXPLAIN them).
        """
        busy = BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms
        if read_only:
            try:
                only = await _connect(path, busy, read_only=True, trace=trace)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"cannot read the database {path}: {exc}") from exc
            try:
                await only.execute_fetchall("SELECT count(*) FROM sqlite_master")
            except sqlite3.DatabaseError as exc:
                await only.close()
                raise StoreError(f"cannot read the database {path}: {exc}") from exc
            return cls(None, only)
        writer: Writer | None = None
        reader: aiosqlite.Connection | None = None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            writer = await Writer.open(path, busy, trace=trace)  # also switches to WAL
            reader = await _connect(path, busy, trace=trace)
            store = cls(writer, reader, settle_retry=settle_retry or SETTLE_RETRY)
            await store._migrate()
            store._hot = _connect_hot(path, trace=trace)
        except BaseException as exc:
            # Each runs a thread that would keep the process from exiting.
            if reader is not None:
                with suppress(sqlite3.Error):
                    await reader.close()
            if writer is not None:
                with suppress(sqlite3.Error):
                    await writer.close()
            if isinstance(exc, OSError | sqlite3.Error):
                raise DatabaseUnavailable(Path(path), exc) from exc
            raise
        return store

    async def close(self) -> None:
        """Commit every write queued so far, then close the connections."""
        if self._writer is not None:
            await self._writer.close()
        await self._reader.close()
        if self._hot is not None:
            self._hot.close()

    @overload
    async def write(self, job: Statement) -> list[Any]: ...

    @overload
    async def write(self, job: Job[T]) -> T: ...

    async def write(self, job: Job[T] | Statement) -> T | list[Any]:
        """Run `job(db)` (or the one Statement) on the writer and return its result once it
        is committed: the one way anything writes (see the module docstring). A read-only
        store refuses as SQLite does (OperationalError), and never queues anything."""
        if self._writer is None:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return await self._writer.run(job)

    @property
    def batch(self) -> int:
        """The writer's batch being run (or last run), numbered from 1: read inside a job, the
        batch that job is part of. 0 for a read-only store."""
        return 0 if self._writer is None else self._writer.batch

    @property
    def commit_counts(self) -> tuple[int, int]:
        """(commits, jobs committed) of this store's writer since it opened: how many
        writes shared each commit. (0, 0) for a read-only store."""
        if self._writer is None:
            return (0, 0)
        return (self._writer.commits, self._writer.jobs)

    @property
    def writer_time(self) -> tuple[int, float, float]:
        """(batches run, seconds spent running them, the writer thread's CPU seconds in them)
        since the store opened. The wall time beyond the CPU is the writer waiting: for each
        commit's fsync, and for the GIL, which the event loop's thread holds while it runs
        Python. (0, 0.0, 0.0) for a read-only store."""
        if self._writer is None:
            return (0, 0.0, 0.0)
        return (self._writer.batch, self._writer.busy_seconds, self._writer.busy_cpu_seconds)

    async def _migrate(self) -> None:
        """Apply the migrations not recorded yet, all in one transaction with their records.

        The applied set is read again inside the writer's transaction (BEGIN IMMEDIATE): two
        processes starting at once (a server and a CLI) never apply one twice, the second
        finds them applied. A start-up with nothing to apply takes no write lock.
        """
        migrations = _migrations()
        if migrations.keys() <= await self._applied_migrations():
            return

        def migrate(db: sqlite3.Connection) -> None:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            applied = {row[0] for row in db.execute("SELECT name FROM schema_migrations")}
            for name, script in migrations.items():
                if name in applied:
                    continue
                for statement in _split_sql(script):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (name, time.time()),
                )

        await self.write(migrate)

    async def _applied_migrations(self) -> set[str]:
        """The migrations recorded in the database (none in a new one)."""
        db = self._reader
        if not await db.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ):
            return set()
        return {row[0] for row in await db.execute_fetchall("SELECT name FROM schema_migrations")}

    async def _read_now(self, sql: str, args: Sequence[object]) -> list[Any]:
        """The rows of ONE small indexed read, run on the event loop itself: no thread hop.

        Only for the hot reads (the key of every request, `status` of up to 100 orders): a
        lookup by index in mapped pages takes microseconds, less than a hop to aiosqlite's
        thread and back, and a WAL reader never waits for the writer. Should the database be
        locked all the same (a crashed writer's WAL being recovered, a checkpoint resetting
        the WAL), the read goes to aiosqlite's thread instead, which waits out the busy timeout
        there: the event loop never waits for a lock. Each call is its own read transaction,
        so it sees every commit made before it, the CLI's included.
        """
        if self._hot is not None:
            try:
                return self._hot.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
        return list(await self._reader.execute_fetchall(sql, args))


async def _connect(
    path: Path | str,
    busy_timeout_ms: int,
    *,
    read_only: bool = False,
    trace: SqlTrace | None = None,
) -> aiosqlite.Connection:
    if read_only:  # mode=ro: SQLite itself refuses any write, and never creates the file
        db = await aiosqlite.connect(
            f"file:{quote(os.fspath(path))}?mode=ro", uri=True, isolation_level=None
        )
    else:
        db = await aiosqlite.connect(str(path), isolation_level=None)
    try:
        if trace is not None:
            await db.set_trace_callback(trace)
        await db.execute_fetchall(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await db.execute_fetchall("PRAGMA foreign_keys=ON")
        await db.execute_fetchall(
            "PRAGMA synchronous=FULL"
        )  # a committed ledger row survives power loss
    except BaseException:
        await db.close()  # its thread would keep the process from exiting
        raise
    return db


def _connect_hot(path: Path | str, *, trace: SqlTrace | None = None) -> sqlite3.Connection:
    """The plain sqlite3 connection of the hot reads (Database._read_now), made and used on the
    event loop's thread. It only reads (query_only) and never waits for a lock (busy timeout 0:
    _read_now takes a busy database to aiosqlite's thread)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if trace is not None:
            db.set_trace_callback(trace)
        for pragma in (
            "busy_timeout=0",
            "query_only=ON",
            f"cache_size=-{HOT_CACHE_KIB}",
            f"mmap_size={HOT_MMAP_BYTES}",
        ):
            db.execute(f"PRAGMA {pragma}").fetchall()
    except BaseException:
        db.close()
        raise
    return db


def _migrations() -> dict[str, str]:
    """The shipped migrations (name -> SQL), in the order they apply."""
    folder = resources.files("router") / "migrations"
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".sql")
    }


def _split_sql(script: str) -> list[str]:
    """A migration's statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].strip()
        if not stripped and not current:
            continue
        current.append(line)
        candidate = "\n".join(current)
        if stripped.endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate.strip())
            current = []
    if "\n".join(current).strip():
        raise ValueError("migration ends inside a statement")
    return statements


def _upstream_taken(exc: sqlite3.IntegrityError) -> bool:
    """Whether the error is the one-local-order-per-upstream-order index (migration 0006)."""
    return "orders.provider, orders.upstream_order" in str(exc)


def _reason(exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if "balance" in text:
        return "the balance would go below zero"
    if "UNIQUE" in text:
        return "that name or key is taken"
    return text
