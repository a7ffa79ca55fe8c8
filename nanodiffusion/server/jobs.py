"""The server's job queue: one worker thread runs generation jobs in the order they came, from a bounded
queue, so that the HTTP event loop only enqueues, polls and cancels and stays responsive while a job runs.

A job is cancelled by a flag that the pipeline's per-step callback checks (`Job.check_cancelled`); a job that
raises is marked failed and the worker goes on with the next one.
"""

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from nanodiffusion.errors import UserError

log = logging.getLogger("nanodiffusion.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; `retry_after` estimates when a slot frees (seconds)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting): retry in about {retry_after} s")
        self.retry_after = retry_after


class _Cancelled(Exception):
    """Raised inside the worker (from the per-step callback) to abandon a cancelled job."""


@dataclass
class GeneratedImage:
    """One finished image of a job: the PNG file (with its metadata) and what describes it."""

    png: bytes
    seed: int
    infotext: str           # A1111's `parameters` text, also stored in the PNG
    request: object         # the GenerationRequest as run


@dataclass(eq=False)
class Job:
    """`num_images` images of `request`, image k with seed `request.seed + k`; progress counts steps."""

    request: object                             # a GenerationRequest with its seed filled in
    num_images: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    image_index: int = 0                        # the image being made
    step: int = 0                               # steps done on that image
    images: list[GeneratedImage] = field(default_factory=list)
    error: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def progress(self) -> float:
        """The fraction of all steps of all images done, in [0, 1]."""
        if self.state == DONE:
            return 1.0
        steps = max(1, self.request.num_steps)
        return min(1.0, (self.image_index + min(self.step, steps) / steps) / self.num_images)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def step_done(self, image_index: int, step: int) -> None:
        """Record progress (called by the worker after each sampler step) and stop here if cancelled."""
        self.image_index, self.step = image_index, step
        self.check_cancelled()

    def check_cancelled(self) -> None:
        """Raise the worker's private exception when the job was cancelled: the generation stops here."""
        if self._cancel.is_set():
            raise _Cancelled

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when the job finishes (from the thread that finishes it), or now if it has."""
        with self._lock:
            if self.state not in FINISHED:
                self._callbacks.append(callback)
                return
        callback()

    def _finish(self, state: str) -> None:
        with self._lock:
            self.state, self.finished = state, time.time()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:                           # e.g. the event loop of a waiter has closed
                log.exception("a callback of job %s failed", self.id)


class JobQueue:
    """Runs `run(job)` for each submitted job, one at a time, on one worker thread.

    At most `max_waiting` jobs wait besides the running one; `submit` raises QueueFull beyond that. The last
    `keep_finished` finished jobs stay retrievable by id.
    """

    def __init__(self, run: Callable[[Job], None], max_waiting: int = 8, keep_finished: int = 16):
        if max_waiting < 1:
            raise UserError(f"the queue size must be >= 1, got {max_waiting}")
        self._run, self.max_waiting, self.keep_finished = run, max_waiting, keep_finished
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}                 # by id, in submission order
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.current: Job | None = None
        self.seconds_per_job = 1.0                      # running mean, for Retry-After

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="nanodiffusion-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and end the worker (it stops at the running job's next step)."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self.current is not None:
                self.current._cancel.set()
            self._lock.notify_all()
        for job in waiting:
            job._cancel.set()
            self._finish(job, CANCELLED)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """How many jobs run before `job` (0: it is next), None when it is not waiting."""
        with self._lock:
            return self._waiting.index(job) + (self.current is not None) if job in self._waiting else None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def cancel(self, job: Job) -> None:
        """A waiting job finishes as cancelled at once, the running one at its next step."""
        with self._lock:
            job._cancel.set()
            if job not in self._waiting:
                return
            self._waiting.remove(job)
        self._finish(job, CANCELLED)

    def _retry_after(self) -> int:
        return max(1, round(self.seconds_per_job * len(self._waiting)))

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self.current = self._waiting.popleft()
                job.state, job.started = RUNNING, time.time()
            self._finish(job, self._run_one(job))
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (job.finished - job.started)
            with self._lock:
                self.current = None

    def _run_one(self, job: Job) -> str:
        """Run the job; its final state. Nothing it raises reaches the worker loop."""
        try:
            job.check_cancelled()
            self._run(job)
            return DONE
        except _Cancelled:
            return CANCELLED
        except UserError as error:
            job.error = str(error)
        except Exception as error:                      # any failure ends this job only, never the worker
            log.exception("job %s failed", job.id)
            job.error = f"{type(error).__name__}: {error}"
        return FAILED

    def _finish(self, job: Job, state: str) -> None:
        job._finish(state)
        with self._lock:                                # forget the oldest finished jobs
            finished = [j for j in self._jobs.values() if j.state in FINISHED]
            for old in finished[:max(0, len(finished) - self.keep_finished)]:
                del self._jobs[old.id]
