"""One writer thread that commits queued writes in groups.

A commit (one fsync) covers every write that queued up while the previous commit ran, so
durable acknowledged writes scale past the disk's fsync rate. Nothing is acknowledged
before its commit returns.

An operation is a function of a connection. Each runs in its own SAVEPOINT within the
group's transaction: one refused with a client error (``GatewayError``) after it wrote — an
arena vote whose preference row went in before the vote was refused — is rolled back to its
savepoint and leaves nothing behind, while the others in the group commit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Connection, Engine

from server.errors import GatewayError

log = logging.getLogger(__name__)

Operation = Callable[[Connection], Any]
MAX_BATCH = 512


class WriterClosed(RuntimeError):
    pass


class GroupCommitWriter:
    def __init__(
        self,
        engine: Engine,
        *,
        on_commit: Callable[[float, int], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ):
        self._engine = engine
        self._queue: queue.Queue[tuple[Operation, Future[Any]] | None] = queue.Queue()
        self._on_commit = on_commit or (lambda seconds, n: None)
        self._on_error = on_error or (lambda: None)
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="aligngate-store-writer", daemon=True
        )
        self._thread.start()

    def submit(self, op: Operation) -> Future[Any]:
        future: Future[Any] = Future()
        if self._closed:
            future.set_exception(WriterClosed("the store is shut down"))
            return future
        self._queue.put((op, future))
        return future

    def close(self, timeout: float = 30) -> None:
        """Finish every queued write, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Operation, Future[Any]]]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self._engine.begin() as conn:
                for op, future in batch:
                    try:
                        with conn.begin_nested():  # a refusal undoes this op's writes only
                            result = op(conn)
                        outcomes.append((future, True, result))
                    except GatewayError as exc:
                        outcomes.append((future, False, exc))
        except Exception:
            # The group failed as a whole (e.g. a constraint): retry each alone, so one
            # bad write cannot fail the others.
            log.warning("Group commit of %d writes failed; retrying one by one", len(batch))
            for op, future in batch:
                self._commit_one(op, future)
            return
        self._on_commit(time.perf_counter() - started, len(batch))
        for future, ok, value in outcomes:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _commit_one(self, op: Operation, future: Future[Any]) -> None:
        started = time.perf_counter()
        try:
            with self._engine.begin() as conn:
                result = op(conn)
        except GatewayError as exc:
            future.set_exception(exc)
            return
        except Exception as exc:
            log.exception("Store write failed")
            self._on_error()
            future.set_exception(exc)
            return
        self._on_commit(time.perf_counter() - started, 1)
        future.set_result(result)
