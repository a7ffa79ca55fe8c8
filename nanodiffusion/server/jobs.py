"""The server's job queue: one worker thread runs jobs in the order they came, from a bounded queue, so that
the HTTP event loop only enqueues, polls and cancels and stays responsive while a job runs.

A job is stopped by a flag that the work checks often (`Job.check_stop`: after each sampler step and, through
`interrupt.checked`, before each layer of the networks); a job that raises is marked failed and the worker
goes on with the next one. Finished jobs are kept for a while, by count and by age.
"""

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.image_loop import StopImage

log = logging.getLogger("nanodiffusion.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
# How a job is stopped: cancel drops the image being made; interrupt (A1111's) ends the job with the
# image being made decoded as far as it got; skip does that to the current image only and goes on.
CANCEL, INTERRUPT, SKIP = "cancel", "interrupt", "skip"
_PRECEDENCE = {None: 0, SKIP: 1, INTERRUPT: 2, CANCEL: 3}
REMEMBERED_EXPIRED_IDS = 10_000             # ids of forgotten jobs, to answer "expired" rather than "no job"


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; `retry_after` estimates when a slot frees (seconds)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting): retry in about {retry_after} s")
        self.retry_after = retry_after


class Stopped(StopImage):
    """Raised inside the worker (by `Job.check_stop`) when the job was asked to stop; `kind` says how: a
    cancel keeps nothing, an interrupt keeps the image being made and ends the job, a skip keeps it and goes
    on (pipelines/image_loop.py)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind
        self.keep, self.resume = kind != CANCEL, kind == SKIP


@dataclass
class GeneratedImage:
    """One finished image of a job: the PNG file (with its metadata) and what describes it."""

    png: bytes
    seed: int
    infotext: str           # A1111's `parameters` text, also stored in the PNG
    request: object         # the GenerationRequest as run
    partial: bool = False   # interrupted or skipped: the denoised estimate at the last step done


@dataclass(eq=False)
class Job:
    """`num_images` images of `request`, image k with seed `request.seed + k`; progress counts `num_steps`
    steps per image. `inputs` holds what else the work needs (img2img's images)."""

    request: object
    num_images: int
    num_steps: int
    inputs: object = None
    controls: tuple = ()                        # ControlNet units (server/controlnets.ControlInput)
    model: object = None                        # the model that ran it (a ModelRecord), set when it starts
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    image_index: int = 0                        # the image being made
    step: int = 0                               # steps done on that image
    images: list[GeneratedImage] = field(default_factory=list)
    preview: tuple[int, bytes] | None = None    # (step, PNG) of the image being made
    interrupted: bool = False
    error: str | None = None
    _stop: str | None = field(default=None, repr=False)
    _callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def progress(self) -> float:
        """The fraction of all steps of all images done, in [0, 1]."""
        if self.state == DONE:
            return 1.0
        steps = max(1, self.num_steps)
        return min(1.0, (self.image_index + min(self.step, steps) / steps) / self.num_images)

    @property
    def cancel_requested(self) -> bool:
        """True once the job was cancelled or interrupted (a skip only ends the current image)."""
        return self._stop in (CANCEL, INTERRUPT)

    def request_stop(self, kind: str) -> None:
        """Ask the work to stop (CANCEL, INTERRUPT or SKIP); a stronger request is never weakened."""
        with self._lock:
            if _PRECEDENCE[kind] > _PRECEDENCE[self._stop]:
                self._stop = kind

    def clear_skip(self) -> None:
        """The skipped image is done with: go on with the next one."""
        with self._lock:
            if self._stop == SKIP:
                self._stop = None

    def step_done(self, image_index: int, step: int) -> None:
        """Record progress (called by the worker after each sampler step) and stop here if asked."""
        self.image_index, self.step = image_index, step
        self.check_stop()

    def check_stop(self) -> None:
        """Raise Stopped when the job was asked to stop: the work ends here. Cheap: runs before each layer."""
        if self._stop is not None:
            raise Stopped(self._stop)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when the job finishes (from the thread that finishes it), or now if it has."""
        with self._lock:
            if self.state not in FINISHED:
                self._callbacks.append(callback)
                return
        callback()

    def _finish(self, state: str) -> None:
        with self._lock:
            self.state, self.finished, self.preview = state, time.time(), None
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:                           # e.g. the event loop of a waiter has closed
                log.exception("a callback of job %s failed", self.id)


class JobQueue:
    """Runs `run(job)` for each submitted job, one at a time, on one worker thread.

    At most `max_waiting` jobs wait besides the running one; `submit` raises QueueFull beyond that. Finished
    jobs stay retrievable by id while they are among the last `keep_finished` and younger than `keep_seconds`.
    """

    def __init__(self, run: Callable[[Job], None], max_waiting: int = 8, keep_finished: int = 100,
                 keep_seconds: float = 3600.0):
        if max_waiting < 1:
            raise UserError(f"the queue size must be >= 1, got {max_waiting}")
        if keep_finished < 1 or not keep_seconds > 0:
            raise UserError(f"finished jobs must be kept (count >= 1, seconds > 0), got {keep_finished} "
                            f"and {keep_seconds}")
        self._run, self.max_waiting = run, max_waiting
        self.keep_finished, self.keep_seconds = keep_finished, keep_seconds
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}                 # by id, in submission order
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()
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
        """Cancel every job and end the worker (the running job stops within a layer of its networks)."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self.current is not None:
                self.current.request_stop(CANCEL)
            self._lock.notify_all()
        for job in waiting:
            job.request_stop(CANCEL)
            self._finish(job, CANCELLED)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job, *, force: bool = False) -> Job:
        """Queue `job`; QueueFull when `max_waiting` jobs wait already (`force`: queue it anyway)."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting and not force:
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, None when there is none or it was forgotten (see `expired`)."""
        self._forget_old()
        return self._jobs.get(job_id)

    def expired(self, job_id: str) -> bool:
        """True when a job with this id finished and was forgotten since."""
        return job_id in self._expired

    def position(self, job: Job) -> int | None:
        """How many jobs run before `job` (0: it is next), None when it is not waiting."""
        with self._lock:
            return self._waiting.index(job) + (self.current is not None) if job in self._waiting else None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def cancel(self, job: Job, kind: str = CANCEL) -> None:
        """A waiting job finishes as cancelled at once; the running one stops as `kind` says."""
        with self._lock:
            job.request_stop(kind)
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
            job.check_stop()
            self._run(job)
            return DONE
        except Stopped as stop:
            job.interrupted = stop.kind != CANCEL
            return CANCELLED if stop.kind == CANCEL else DONE
        except UserError as error:
            job.error = str(error)
        except Exception as error:                      # any failure ends this job only, never the worker
            log.exception("job %s failed", job.id)
            job.error = f"{type(error).__name__}: {error}"
        return FAILED

    def _finish(self, job: Job, state: str) -> None:
        job._finish(state)
        self._forget_old()

    def _forget_old(self) -> None:
        """Forget finished jobs beyond the last `keep_finished` or older than `keep_seconds`."""
        with self._lock:
            finished = [job for job in self._jobs.values() if job.state in FINISHED]
            too_old = time.time() - self.keep_seconds
            surplus = len(finished) - self.keep_finished
            for k, job in enumerate(finished):
                if k < surplus or job.finished < too_old:
                    del self._jobs[job.id]
                    self._expired[job.id] = None
            while len(self._expired) > REMEMBERED_EXPIRED_IDS:
                self._expired.popitem(last=False)
