import os
import signal
import time

import pytest

from tirsynth import parallel


def square_and_pid(item: int) -> tuple[int, int]:
    time.sleep(0.005)  # long enough that every process gets some items
    return item * item, os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_item_once_and_every_process_works(workers):
    with parallel.fork_map(square_and_pid, list(range(40)), workers) as results:
        got = list(results)
    assert sorted(value for value, _ in got) == [i * i for i in range(40)]
    pids = {pid for _, pid in got}
    assert os.getpid() in pids  # this process works too
    assert len(pids) == workers


PARENT = os.getpid()


def fail_in_worker(item: int) -> int:
    time.sleep(0.002)
    if os.getpid() != PARENT:
        raise ValueError(f"bad item {item}")
    return item


def test_a_worker_error_is_raised_here_with_its_traceback():
    started = time.monotonic()
    with pytest.raises(ValueError, match="bad item") as caught:
        with parallel.fork_map(fail_in_worker, list(range(1000)), 2) as results:
            list(results)
    assert time.monotonic() - started < 0.5  # not after the other 999 items (2 s)
    assert isinstance(caught.value.__cause__, parallel.WorkerTraceback)
    assert "fail_in_worker" in str(caught.value.__cause__)


def die_in_worker(item: int) -> int:
    time.sleep(0.002)
    if os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def test_a_killed_worker_is_reported_not_waited_for():
    done = []
    with pytest.raises(parallel.WorkerLost, match=r"1 of 60 .*exit codes -9"):
        with parallel.fork_map(die_in_worker, list(range(60)), 2) as results:
            done += results
    assert len(done) == 59  # this process did every item but the one the worker held


@pytest.fixture
def forked(monkeypatch) -> list[int]:
    pids = []
    fork = os.fork

    def recording_fork() -> int:
        pid = fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    return pids


def test_stopping_early_stops_and_reaps_the_workers(forked):
    with parallel.fork_map(square_and_pid, list(range(1000)), 3) as results:
        next(results)
    assert len(forked) == 2
    for pid in forked:  # already waited for: no zombie, nothing left running
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_more_items_than_the_pipe_holds_are_taken_in_runs(monkeypatch):
    monkeypatch.setattr(parallel, "_grow_pipe", lambda fd, wanted: 64)  # 16 records
    queue = parallel._ItemQueue(100)
    taken = []
    while (run := queue.take()) is not None:
        taken += list(run)
    queue.close()
    assert taken == list(range(100))
    assert queue.step == 7


def fail_here(item: int) -> int:
    time.sleep(0.005)
    if os.getpid() == PARENT:
        raise KeyError(item)
    return item


def test_an_error_here_terminates_the_workers(forked):
    started = time.monotonic()
    with pytest.raises(KeyError):
        with parallel.fork_map(fail_here, list(range(1000)), 2) as results:
            list(results)
    # The worker alone would take 2.5 s or more for its share of the 1,000 items; the bound
    # leaves room for a forked child that prints a stack on SIGTERM (Ray's handler does).
    assert time.monotonic() - started < 1.5
    assert len(forked) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(forked[0], os.WNOHANG)
