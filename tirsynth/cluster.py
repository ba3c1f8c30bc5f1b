"""Ray for the stages: join a cluster or start a local one, and keep its logs out of the way.

Ray writes to the driver's stderr from Python loggers (a token-authentication WARNING, Ray
Data's execution plan), from its C++ core worker (error-level lines about actor restarts)
and from the worker processes it forwards. A user reads those as failures, and they bury
the progress bar. `ray_session` sends all of it, at the file-descriptor level so that the
C++ lines are caught too, to a log file in the run's output folder, and hands the caller
the real terminal for its own progress bar.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOG_NAME = "ray.log"
OBJECT_STORE_SHARE = 0.3  # of the machine's memory: Ray's own default share
MIN_OBJECT_STORE_BYTES = 256 << 20


@contextmanager
def ray_session(address: str | None, log_file: Path, verbose: bool = False) -> Iterator[TextIO]:
    """Start Ray (or use the running one) for the `with` block; yields where to print.

    Args:
        address: a cluster to join; None starts a local one.
        log_file: where Ray's own output goes, appended (unless `verbose`).
        verbose: leave Ray's output on stderr, as Ray prints it.
    """
    import ray

    with _stderr_to(None if verbose else log_file) as console:
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=address,
                include_dashboard=False,
                object_store_memory=None if address else local_object_store_bytes(),
                log_to_driver=verbose,  # quiet: workers' output stays in Ray's session logs
            )
        try:
            yield console
        finally:
            if started_here:
                ray.shutdown()


def local_object_store_bytes(
    memory: int | None = None, shared_memory_free: int | None = None
) -> int:
    """The object store of a local Ray: OBJECT_STORE_SHARE of this machine's memory, but
    no more than 90% of what /dev/shm has free (a container's /dev/shm is often small, and
    Ray then falls back to a slow disk-backed store and says so on every start).

    Args:
        memory: the machine's memory in bytes (default: this machine's).
        shared_memory_free: free bytes in /dev/shm (default: this machine's).
    """
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if shared_memory_free is None:
        shm = Path("/dev/shm")
        shared_memory_free = shutil.disk_usage(shm).free if shm.is_dir() else memory
    wanted = min(int(OBJECT_STORE_SHARE * memory), int(0.9 * shared_memory_free))
    return max(MIN_OBJECT_STORE_BYTES, wanted)


@contextmanager
def _stderr_to(log_file: Path | None) -> Iterator[TextIO]:
    """Point file descriptor 2 at `log_file` for the block; yield the original stderr."""
    if log_file is None:
        yield sys.stderr
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = os.fdopen(os.dup(terminal), "w", buffering=1)
    try:
        os.dup2(log, 2)
        yield console
    finally:
        sys.stderr.flush()
        console.flush()
        os.dup2(terminal, 2)
        for fd in (terminal, log):
            os.close(fd)
        console.close()
