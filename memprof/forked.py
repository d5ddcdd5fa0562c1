"""Independent jobs (estimates, fit searches) in forked worker processes, at most ``workers`` of them, each
job given to an idle worker in the order submitted.

Unlike a ``ProcessPoolExecutor``, whose workers share one result queue (one that dies breaks the pool and
fails every job), each worker here has a pipe of its own: a worker that dies (killed, out of memory) fails
only the job it held; a new one takes the jobs that wait. A worker serves job after job, so what a first job
warms (imports, torch's dispatch caches) serves the next. A worker dies with the thread that forked it
(``PR_SET_PDEATHSIG`` on Linux: memprof killed even by SIGKILL takes it along), ignores Ctrl-C (the parent
stops it) and stops at SIGTERM; ``ForkedJobs.close`` kills every worker (the results are taken, or the run
was stopped).
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
    """A job's worker process ended without sending its result."""


class Job:
    """One submitted job (a function and its arguments, sent to a worker pickled) and, once in, its outcome."""

    def __init__(self, jobs: ForkedJobs, function: Callable[..., Any], args: tuple) -> None:
        self.jobs, self.function, self.args = jobs, function, args
        self.outcome: tuple[str, Any] | None = None
        self.cancelled = False

    def result(self) -> Any:
        """What the job returned; what it raised is raised here; ``WorkerDied`` where its worker died."""
        self.jobs.wait_for(self)
        kind, value = self.outcome
        if kind == "raised":
            raise value
        if kind == "died":
            raise WorkerDied(value)
        return value

    def cancel(self) -> None:
        """Never give it to a worker (one that holds it already is stopped by ``ForkedJobs.close``)."""
        self.cancelled = True


class _Worker:
    """A forked process serving one job at a time over its own pipe."""

    def __init__(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, os.getpid()))
        self.process.start()
        theirs.close()  # the worker holds the only other end: its death is this end's end of file
        self.job: Job | None = None

    def give(self, job: Job) -> bool:
        """Send ``job`` to this idle worker; False where the worker died while idle (it is then reaped)."""
        try:
            self.connection.send((job.function, job.args))
        except OSError:
            self.stop()
            return False
        except Exception as exc:  # noqa: BLE001 - a job that does not pickle fails as the job
            job.outcome = ("raised", exc)
            return True
        self.job = job
        return True

    def collect(self) -> bool:
        """Read the outcome of the job held; False where the worker died instead (it is then reaped)."""
        job, self.job = self.job, None
        try:
            job.outcome = self.connection.recv()
        except (EOFError, OSError):
            self.stop()
            job.outcome = ("died", f"the estimating process died ({_ending(self.process.exitcode)})")
            return False
        return True

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class ForkedJobs:
    """Jobs in at most ``workers`` forked processes (see the module)."""

    def __init__(self, workers: int) -> None:
        self.size = workers
        self.waiting: collections.deque[Job] = collections.deque()
        self.workers: list[_Worker] = []

    def submit(self, function: Callable[..., Any], *args: Any) -> Job:
        job = Job(self, function, args)
        self.waiting.append(job)
        self._assign()
        return job

    def wait_for(self, job: Job) -> None:
        """Collect outcomes as they come (a worker blocked on sending a large result is free only once read),
        giving waiting jobs to free workers, until ``job``'s is in."""
        from multiprocessing.connection import wait

        if job.cancelled and job.outcome is None:
            raise concurrent.futures.CancelledError()
        while True:
            self._assign()
            if job.outcome is not None:
                return
            busy = [w for w in self.workers if w.job is not None]
            ready = wait([w.connection for w in busy])
            for worker in [w for w in busy if w.connection in ready]:
                if not worker.collect():
                    self.workers.remove(worker)

    def close(self) -> None:
        """Start nothing more and kill every worker."""
        self.waiting.clear()
        for worker in self.workers:
            worker.process.kill()
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def _assign(self) -> None:
        """Give waiting jobs to idle workers, forking new ones up to ``size``."""
        while self.waiting:
            idle = next((w for w in self.workers if w.job is None), None)
            if idle is None and len(self.workers) >= self.size:
                return
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            fresh = idle is None
            if fresh:
                idle = _Worker()
                self.workers.append(idle)
            if not idle.give(job):  # the worker died while idle: the job goes to another (a new one: fails)
                self.workers.remove(idle)
                if fresh:
                    job.outcome = ("died", f"the estimating process died ({_ending(idle.process.exitcode)})")
                else:
                    self.waiting.appendleft(job)


def _serve(connection: Any, parent: int) -> None:
    """In a worker: run each job sent, and send back what it returned or raised, until the pipe closes."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            function, args = connection.recv()
        except EOFError:
            return
        try:
            outcome: tuple[str, Any] = ("returned", function(*args))
        except BaseException as exc:  # noqa: BLE001 - the parent raises it
            outcome = ("raised", exc)
        try:
            connection.send(outcome)
        except Exception:  # noqa: BLE001 - an outcome that does not pickle: said in words
            said = describe(outcome[1]) if outcome[0] == "raised" else f"{type(outcome[1]).__name__} does not pickle"
            connection.send(("raised", RuntimeError(f"a forked job's outcome cannot be sent back: {said}")))


def _ending(code: int | None) -> str:
    if code is not None and code < 0 and -code in signal.valid_signals():
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
