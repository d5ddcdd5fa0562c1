"""Independent jobs (estimates, fit searches) in forked processes: one process per job, at most ``workers``
at a time, started in the order submitted.

A process of its own per job, rather than a shared pool's worker, so that a process that dies (killed, out
of memory) fails only the job it ran, never the others. A job's process dies with the thread that forked it
(``PR_SET_PDEATHSIG`` on Linux: memprof killed even by SIGKILL takes it along), ignores Ctrl-C (the parent
stops it) and stops at SIGTERM; ``ForkedJobs.close`` kills every process still running (the results are
taken, or the run was stopped).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
from typing import Any, Callable

from memprof.errors import describe
from memprof.measure.isolation import die_with_parent


class WorkerDied(Exception):
    """A job's process ended without sending its result."""


class Job:
    """One submitted job: its process once started, then its outcome."""

    def __init__(self, jobs: ForkedJobs, call: Callable[[], Any]) -> None:
        self.jobs, self.call = jobs, call
        self.process: Any = None
        self.reader: Any = None
        self.outcome: tuple[str, Any] | None = None
        self.cancelled = False

    def result(self) -> Any:
        """What the job returned; what it raised is raised here; ``WorkerDied`` where its process died."""
        self.jobs.wait_for(self)
        kind, value = self.outcome
        if kind == "raised":
            raise value
        if kind == "died":
            raise WorkerDied(value)
        return value

    def cancel(self) -> None:
        """Not started: never start it (a running job is stopped by ``ForkedJobs.close``)."""
        self.cancelled = self.process is None

    def start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.reader, writer = context.Pipe(duplex=False)
        self.process = context.Process(target=_run_job, args=(self.call, writer, os.getpid()))
        self.process.start()
        writer.close()  # the child holds the only writing end: its death is the reader's end of file

    def collect(self) -> None:
        """Read the outcome of a job whose process sent it or ended."""
        try:
            self.outcome = self.reader.recv()
        except (EOFError, OSError):
            self.process.join()
            self.outcome = ("died", f"the estimating process died ({_ending(self.process.exitcode)})")
        self.reader.close()
        self.process.join()


class ForkedJobs:
    """Jobs each in a forked process of its own, at most ``workers`` running at once (see the module)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []

    def submit(self, function: Callable[..., Any], *args: Any) -> Job:
        job = Job(self, lambda: function(*args))
        self.waiting.append(job)
        self._fill()
        return job

    def wait_for(self, job: Job) -> None:
        """Collect the outcomes of running jobs as they come (a process blocked on sending a large result
        frees its place only once read), starting waiting ones, until ``job``'s is in."""
        from multiprocessing.connection import wait

        if job.cancelled:
            raise concurrent.futures.CancelledError()
        while job.outcome is None:
            ready = wait([j.reader for j in self.running])
            for done in [j for j in self.running if j.reader in ready]:
                done.collect()
                self.running.remove(done)
            self._fill()

    def close(self) -> None:
        """Start nothing more and kill every process still running."""
        self.waiting.clear()
        for job in self.running:
            job.process.kill()
        for job in self.running:
            job.process.join()
            job.reader.close()
        self.running.clear()

    def _fill(self) -> None:
        while self.waiting and len(self.running) < self.workers:
            job = self.waiting.popleft()
            if not job.cancelled:
                job.start()
                self.running.append(job)


def _run_job(call: Callable[[], Any], writer: Any, parent: int) -> None:
    """In the forked process: run the job and send what it returned or raised."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        outcome: tuple[str, Any] = ("returned", call())
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        outcome = ("raised", exc)
    try:
        writer.send(outcome)
    except Exception:  # noqa: BLE001 - an outcome that does not pickle: said in words
        writer.send(("raised", RuntimeError(describe(outcome[1]) if outcome[0] == "raised" else
                                            f"a forked job's result cannot be sent back: {type(outcome[1])}")))


def _ending(code: int | None) -> str:
    if code is not None and code < 0 and -code in signal.valid_signals():
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
