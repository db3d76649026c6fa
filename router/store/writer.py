"""The one writer: every write of the store, group-committed in its own thread.

A write is a job, a plain function `job(db: sqlite3.Connection) -> T` that runs its
statements on the writer's connection and returns what its caller needs (fetch what a
statement returns inside the job: a cursor must not outlive it). `await writer.run(job)`
queues it and answers with its result (or raises its exception) once it is committed.

The writer's thread takes every job waiting in the queue (at most MAX_BATCH) and runs them
as ONE `BEGIN IMMEDIATE` transaction, each inside its own SAVEPOINT, then ONE `COMMIT`:
one fsync for the whole batch, and only then is any caller answered. A job that raises is
rolled back to its savepoint and gets its exception; the others of its batch go on. A BEGIN
or COMMIT that fails (locked past the busy timeout, an I/O error, a full disk) fails every
job of the batch with that error, and nothing of the batch is stored; so does an error that
ends the whole transaction midway (the jobs not run yet go on in the next batch).

A job never begins, commits or rolls back (that is the writer's) and never awaits (it runs in
the writer's thread). A caller cancelled while its job waits or runs gets the cancel only once
the job has ended: its outcome is known, and the result dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar, overload

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]


@dataclass(frozen=True, slots=True)
class Statement:
    """A job that is ONE statement: `await writer.run(Statement(sql, args))` answers its rows
    (a RETURNING clause's), once committed.

    It runs without a savepoint of its own, two statements fewer for the writer on the hot
    path of `add`: SQLite undoes a statement that fails as a whole (a constraint, or a trigger's
    RAISE(ABORT), the only RAISE the migrations use), or else rolls back the whole transaction,
    which the writer sees and deals with as it does for any job. Two statements that must stand
    or fall together need a job function, and the savepoint it gets.
    """

    sql: str
    args: Sequence[object] = ()


MAX_BATCH: Final = 256  # jobs per commit at most: one commit never waits behind thousands
WAL_RETRY_SECONDS: Final = 0.01


@dataclass(slots=True)
class _Queued(Generic[T]):
    job: Job[T] | Statement
    future: asyncio.Future[T]
    # Both touched on the loop only. `ended`, made by a caller cancelled while its job waits
    # or runs, is resolved when the job is over (the usual caller awaits `future` alone);
    # `over` says the job's outcome came back, should it come before `ended` is made.
    ended: asyncio.Future[None] | None = None
    over: bool = False


_STOP: Final = object()  # after every job queued before it: the thread ends

_Answer = tuple["_Queued[Any]", object, BaseException | None]


class WriterClosed(sqlite3.OperationalError):
    """A write after the store was closed (or its writer's thread ended)."""


class Writer:
    """One `sqlite3` connection and the one thread that uses it (see the module docstring)."""

    def __init__(self, db: sqlite3.Connection, *, max_batch: int = MAX_BATCH) -> None:
        self._db = db
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Queued[Any] | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
        self._closed = False
        # Written by the writer's thread only; read anywhere (whole ints: no torn reads).
        self.batch = 0  # the batch being run (or last run), from 1: a job may read it
        self.commits = 0  # batches committed
        self.jobs = 0  # jobs committed (each of them succeeded)
        # Wall time spent running batches, and the thread's CPU in them: what is left between
        # the two is waiting, for the disk (each commit's fsync) and for the GIL.
        self.busy_seconds = 0.0
        self.busy_cpu_seconds = 0.0

    @classmethod
    async def open(
        cls,
        path: Path | str,
        busy_timeout_ms: int,
        *,
        trace: Callable[[str], object] | None = None,
        max_batch: int | None = None,
    ) -> Writer:
        """Connect (WAL, foreign keys, synchronous=FULL, the busy timeout) and start the thread.

        `trace` sees every statement, values filled in, called on this event loop.
        `max_batch` (default MAX_BATCH, read now: tests shorten it) bounds a batch.
        """
        loop = asyncio.get_running_loop()
        forward = None if trace is None else _on_loop(loop, trace)
        db = await asyncio.to_thread(_connect, path, busy_timeout_ms, forward)
        writer = cls(db, max_batch=MAX_BATCH if max_batch is None else max_batch)
        writer._thread.start()
        return writer

    @overload
    async def run(self, job: Statement) -> list[Any]: ...

    @overload
    async def run(self, job: Job[T]) -> T: ...

    async def run(self, job: Job[T] | Statement) -> T | list[Any]:
        """`job(db)` (or the Statement) in the next batch; its result once the batch is
        committed."""
        if self._closed:
            raise WriterClosed("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T | list[Any]] = loop.create_future()
        queued: _Queued[T | list[Any]] = _Queued(job, future)
        self._queue.put(queued)
        try:
            # Awaited as it is, not shielded: a cancel cancels `future`, which the writer then
            # skips (`_deliver`), while the job itself goes on; `ended` says when it is over.
            return await future
        except asyncio.CancelledError:
            if not future.cancelled():
                future.exception()  # it ended before the cancel came: dropped on purpose
            elif not queued.over:  # the job is still queued or running: wait for its end
                queued.ended = loop.create_future()
                await asyncio.wait([queued.ended])
            raise

    async def close(self) -> None:
        """Run every job queued so far, then stop the thread and close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
        elif self._thread.ident is None:  # never started: the connection is still here
            self._db.close()

    # --- The writer's thread ------------------------------------------------------------------

    def _serve(self) -> None:
        pending: list[_Queued[Any]] = []
        stopping = False
        try:
            while pending or not stopping:
                if not pending:
                    item = self._queue.get()
                    if item is _STOP:
                        break
                    assert isinstance(item, _Queued)
                    pending.append(item)
                while not stopping and len(pending) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                    else:
                        assert isinstance(item, _Queued)
                        pending.append(item)
                batch, pending = pending[: self._max_batch], pending[self._max_batch :]
                started, started_cpu = time.perf_counter(), time.thread_time()
                pending = self._run_batch(batch) + pending
                self.busy_seconds += time.perf_counter() - started
                self.busy_cpu_seconds += time.thread_time() - started_cpu
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self._closed = True
            failed = WriterClosed(f"the store's writer stopped: {exc!r}")
            while True:
                with contextlib.suppress(queue.Empty):
                    item = self._queue.get_nowait()
                    if isinstance(item, _Queued):
                        pending.append(item)
                    continue
                break
            _answer([(q, None, failed) for q in pending])
            raise
        finally:
            self._db.close()

    def _run_batch(self, batch: list[_Queued[Any]]) -> list[_Queued[Any]]:
        """Run `batch` as one transaction and answer its callers; the jobs it did not get to
        (an error ended the whole transaction first), for the next batch."""
        db = self._db
        self.batch += 1
        try:
            db.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            _answer([(q, None, exc) for q in batch])
            return []
        answers: list[_Answer] = []
        for index, queued in enumerate(batch):
            job = queued.job
            try:
                if isinstance(job, Statement):
                    answers.append(_run_statement(db, queued, job))
                    continue
                db.execute("SAVEPOINT job")
                try:
                    result = job(db)
                except BaseException as exc:
                    if not db.in_transaction:
                        raise _TransactionLost(exc) from exc
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                    answers.append((queued, None, exc))
                else:
                    db.execute("RELEASE job")
                    answers.append((queued, result, None))
            except BaseException as exc:
                # The transaction is gone, or cannot go on (its savepoints failed): what ran
                # in it is not stored. This job gets its own error, those before it this one.
                cause = exc.cause if isinstance(exc, _TransactionLost) else exc
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                ran = [(done, None, error or cause) for done, _, error in answers]
                _answer([*ran, (queued, None, cause)])
                return batch[index + 1 :]
        try:
            db.execute("COMMIT")
        except Exception as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            _answer([(done, None, error or exc) for done, _, error in answers])
            return []
        self.commits += 1
        self.jobs += sum(error is None for _, _, error in answers)
        _answer(answers)
        return []


class _TransactionLost(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _run_statement(db: sqlite3.Connection, queued: _Queued[Any], job: Statement) -> _Answer:
    """One Statement job in the open transaction: its rows, or its error when SQLite undid
    it alone. Raise _TransactionLost when the transaction is gone, or when something other
    than SQLite failed: whether the statement's changes stand is then unknown, and the whole
    transaction must go."""
    try:
        rows = db.execute(job.sql, job.args).fetchall()
    except sqlite3.Error as exc:
        if not db.in_transaction:
            raise _TransactionLost(exc) from exc
        return (queued, None, exc)
    except BaseException as exc:
        raise _TransactionLost(exc) from exc
    return (queued, rows, None)


def _answer(answers: list[_Answer]) -> None:
    """Hand each caller its outcome on its own loop, one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0].future.get_loop(), []).append(answer)
    for loop, theirs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_deliver, theirs)


def _deliver(answers: list[_Answer]) -> None:
    for queued, result, error in answers:
        future = queued.future
        queued.over = True
        if future.done():  # its caller was cancelled: it only waits to know the job ended
            if queued.ended is not None and not queued.ended.done():
                queued.ended.set_result(None)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _on_loop(
    loop: asyncio.AbstractEventLoop, trace: Callable[[str], object]
) -> Callable[[str], None]:
    """`trace`, called on `loop` (in order, before the answer of the job that ran it) rather
    than in the writer's thread: what it touches needs no lock."""

    def forward(statement: str) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(trace, statement)

    return forward


def _connect(
    path: Path | str, busy_timeout_ms: int, trace: Callable[[str], None] | None
) -> sqlite3.Connection:
    """The writer's connection, in WAL mode; run in a worker thread (it may wait)."""
    # check_same_thread off: opened here, then used by the writer's thread alone.
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        if trace is not None:
            db.set_trace_callback(trace)
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=FULL")  # a committed ledger row survives power loss
        _use_wal(db, busy_timeout_ms)
    except BaseException:
        db.close()
        raise
    return db


def _use_wal(db: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Switch the database to WAL, waiting out another process doing the same.

    Two processes opening a new database at once (a server and a CLI) both ask: SQLite answers
    one of them "locked" at once, without the busy timeout (both hold a read lock, and waiting
    could deadlock), so that one asks again until the busy timeout has passed.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchall()  # fetched: the statement ends
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(WAL_RETRY_SECONDS)
