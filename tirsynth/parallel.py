"""`fork_map`: a function over a list, in this process and forked ones, results as they finish.

Ingest's work is short file work: on two cores a few hundred pairs take about as long as
starting and joining a `multiprocessing.Pool`, whose parent sits idle meanwhile. Here the
calling process works too, each extra worker costs one fork, and the processes take items
one at a time from a shared queue, so a slow or busy core does not hold the others back.
"""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import select
import signal
import struct
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size for unprivileged processes


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process (its `__cause__`)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


class WorkerLost(RuntimeError):
    """A worker process died without finishing the items it took."""


@contextmanager
def fork_map(function: Callable[[Any], Any], items: list, workers: int) -> Iterator[Iterator[Any]]:
    """Results of `function` over `items` as they finish, in any order.

    Args:
        function: called once per item; an exception in any process is re-raised here
            (with the worker's traceback as its cause) and stops the others.
        items: the work; each process takes the next item when it is free.
        workers: processes in all, this one included (all in this process when 1 or
            there is only one item).

    Raises:
        WorkerLost: at the end, when a worker died (killed, out of memory) and some
            items have no result.
    """
    if workers <= 1 or len(items) <= 1:
        yield map(function, items)
        return
    queue = _ItemQueue(len(items))
    children: list[_Child] = []
    try:
        for _ in range(min(workers, len(items)) - 1):
            children.append(_Child.fork(function, items, queue, children))
        yield _gather(function, items, queue, children)
    except BaseException:
        for child in children:
            child.terminate()
        raise
    finally:
        queue.close()
        for child in children:
            child.wait()


class _ItemQueue:
    """Item numbers in a pipe, all written before the fork: a 4-byte read takes one item
    (pipe reads are atomic), and an empty pipe with no writer left reads as the end."""

    RECORD = struct.Struct("<I")

    def __init__(self, count: int):
        read_fd, write_fd = os.pipe()
        capacity = _grow_pipe(write_fd, count * self.RECORD.size) // self.RECORD.size
        # More items than the pipe holds: each record stands for a run of items.
        self.step, self.count, self.fd = math.ceil(count / capacity), count, read_fd
        records = b"".join(self.RECORD.pack(i) for i in range(0, count, self.step))
        view = memoryview(records)
        while view:
            view = view[os.write(write_fd, view) :]
        os.close(write_fd)

    def take(self) -> range | None:
        record = os.read(self.fd, self.RECORD.size)
        if not record:
            return None
        start = self.RECORD.unpack(record)[0]
        return range(start, min(start + self.step, self.count))

    def close(self) -> None:
        """Take every item left, so that the workers stop after their current one."""
        if self.fd >= 0:
            while os.read(self.fd, PIPE_BYTES):
                pass
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Child:
    pid: int
    results: Connection
    exit_code: int | None = field(default=None)

    @classmethod
    def fork(
        cls, function: Callable, items: list, queue: _ItemQueue, siblings: list[_Child]
    ) -> _Child:
        reader, writer = Pipe(duplex=False)
        # A worker blocks when its results fill the pipe while this process is busy.
        _grow_pipe(writer.fileno(), PIPE_BYTES)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reader.close()
                for sibling in siblings:  # so that each pipe's end is seen when its worker exits
                    sibling.results.close()
                code = _serve(function, items, queue, writer)
                writer.close()  # the parent sees the end now, not after this process's teardown
            finally:
                os._exit(code)  # no interpreter teardown: nothing of the parent's runs twice
        writer.close()
        return cls(pid, reader)

    def terminate(self) -> None:
        if self.exit_code is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        if self.exit_code is None:
            self.results.close()  # a worker blocked on a full pipe gets EPIPE and exits
            self.exit_code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.exit_code


def _serve(function: Callable, items: list, queue: _ItemQueue, results: Connection) -> int:
    """A worker's loop; returns its exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops the workers
    try:
        while (taken := queue.take()) is not None:
            for number in taken:
                results.send(("result", function(items[number])))
    except BrokenPipeError:  # the parent is gone or gave up
        return 1
    except BaseException as err:
        trace = traceback.format_exc()
        try:
            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        try:
            results.send(("error", err, trace))
        except OSError:
            pass
        return 1
    return 0


def _gather(
    function: Callable, items: list, queue: _ItemQueue, children: list[_Child]
) -> Iterator[Any]:
    open_results = {child.results: child for child in children}
    received = 0

    def ready(timeout: float | None) -> Iterator[Any]:
        for connection in wait(list(open_results), timeout):
            try:
                message = connection.recv()
            except EOFError:  # the worker exited
                del open_results[connection]
                continue
            if message[0] == "error":
                raise message[1] from WorkerTraceback(message[2])
            yield message[1]

    while (taken := queue.take()) is not None:
        for number in taken:
            yield function(items[number])
            received += 1
            for result in ready(0):
                yield result
                received += 1
    while open_results:
        for result in ready(None):
            yield result
            received += 1
    if received < len(items):
        codes = ", ".join(str(child.wait()) for child in children)
        raise WorkerLost(
            f"{len(items) - received} of {len(items)} work items have no result: a worker "
            f"process died (exit codes {codes}; negative = killed by that signal)"
        )


def _grow_pipe(fd: int, wanted: int) -> int:
    """Make the pipe hold `wanted` bytes where the system allows; returns its capacity."""
    try:
        size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (AttributeError, OSError):  # not Linux: assume only what POSIX promises
        return select.PIPE_BUF
    if wanted > size:
        try:
            size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(wanted, PIPE_BYTES))
        except OSError:  # over pipe-max-size or the user's pipe limit: keep what it has
            pass
    return size
