"""What the server's stop checks and live previews cost, and how soon a stop takes effect (issues 13 and 14).

Runs the server's worker function (`server.generation.run_job`) on the built-in text-to-image model:
    checks      the cost of one stop check (a tiny Linear called with and without it, best of several
                rounds: robust on a busy machine) times the checks per UNet pass, against a pass; and
                seconds per image with and without the checks
    previews    seconds per image with previews off and within the default budget (5 % of sampling time)
    stop        the time from a cancel request to the job's end, asked half-way through a step; against it,
                a whole step (the old bound: a stop waited for the step to end) and the slowest layer

    OMP_NUM_THREADS=1 python benchmarks/server_stops_previews.py [--size 256] [--steps 20] [--repeats 3]
"""

import argparse
import statistics
import threading
import time
from dataclasses import replace

from pathlib import Path

import torch

from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.pipelines.request import GenerationRequest
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.server.generation import PREVIEW_BUDGET, Previews, run_job
from nanodiffusion.server.interrupt import CHECKED_LAYERS, checked
from nanodiffusion.server.jobs import CANCEL, Job, JobQueue

MODEL = ModelRecord("builtin", Path("builtin"), None, "fp32", "cpu")


def median_seconds(call, repeats: int) -> float:
    """Median seconds of `call(seed)` over `repeats` calls after a warm-up call."""
    times = []
    for seed in range(repeats + 1):
        start = time.perf_counter()
        call(seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def generate(pipe, request, hooks: bool):
    """One image with pipe.generate, with the stop checks installed or not."""
    def call(seed):
        if not hooks:
            return pipe.generate(replace(request, seed=seed))
        with checked([pipe.unet, pipe.vae, pipe.text_encoder], lambda: None):
            return pipe.generate(replace(request, seed=seed))
    return call


class CountedPreviews(Previews):
    """Previews that also count how many were made and the seconds they took, over all images."""

    count, seconds = 0, 0.0

    def spend(self, seconds: float) -> None:
        super().spend(seconds)
        self.count, self.seconds = self.count + 1, self.seconds + seconds


def worker(pipe, request, previews: Previews):
    """One image as the server's worker makes it (stop checks on), with `previews`."""
    return lambda seed: run_job(pipe, MODEL, Job(replace(request, seed=seed), 1, request.num_steps), previews)


def check_overhead_seconds(rounds: int = 7, calls: int = 5000) -> float:
    """Seconds one stop check adds to a layer call: a tiny Linear with and without it, best of `rounds`."""
    layer, x = torch.nn.Linear(4, 4), torch.randn(1, 4)

    def best() -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            times.append((time.perf_counter() - start) / calls)
        return min(times)

    with torch.no_grad():
        plain = best()
        with checked([layer], lambda: None):
            return best() - plain


def slowest_layer(pipe, request) -> float:
    """The longest single conv/linear forward of one image (what bounds the time to a stop)."""
    longest, started = [0.0], {}

    def before(module, args):
        started[module] = time.perf_counter()

    def after(module, args, output):
        longest[0] = max(longest[0], time.perf_counter() - started.pop(module))

    layers = [m for net in (pipe.unet, pipe.vae) for m in net.modules() if isinstance(m, CHECKED_LAYERS)]
    handles = [m.register_forward_pre_hook(before) for m in layers] + [m.register_forward_hook(after)
                                                                       for m in layers]
    pipe.generate(request)
    for handle in handles:
        handle.remove()
    return longest[0]


def stop_latency(pipe, request, step_seconds: float) -> float:
    """Seconds from a cancel, requested half-way through step 2, to the job's end."""
    queue = JobQueue(lambda job: run_job(pipe, MODEL, job))
    queue.start()
    job = queue.submit(Job(request, 1, request.num_steps))
    while job.step < 1:
        time.sleep(0.001)
    time.sleep(step_seconds / 2)
    done = threading.Event()
    job.add_done_callback(done.set)
    start = time.perf_counter()
    queue.cancel(job, CANCEL)
    done.wait()
    latency = time.perf_counter() - start
    queue.stop()
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = TextToImage.from_pretrained("builtin")
    pipe.show_progress = False
    request = replace(GenerationRequest("a photo of a sneaker", **pipe.generation_defaults),
                      num_steps=args.steps, height=args.size, width=args.size, seed=0)
    print(f"built-in model, {args.size}x{args.size}, {args.steps} steps, {torch.get_num_threads()} thread(s)")
    plain = median_seconds(generate(pipe, request, hooks=False), args.repeats)
    hooked = median_seconds(generate(pipe, request, hooks=True), args.repeats)
    checks = sum(isinstance(m, CHECKED_LAYERS) for m in pipe.unet.modules())
    per_check = check_overhead_seconds()
    print(f"stop checks: {per_check * 1e6:.2f} us each, {checks} per UNet pass: "
          f"{per_check * checks * 1e3:.2f} ms per pass, {per_check * checks * args.steps / plain:.2%} of an image; wall clock {plain:.3f} s -> "
          f"{hooked:.3f} s per image ({(hooked / plain - 1) * 100:+.1f} %)")
    without = median_seconds(worker(pipe, request, Previews(0.0)), args.repeats)
    counted = CountedPreviews(PREVIEW_BUDGET)
    with_previews = median_seconds(worker(pipe, request, counted), args.repeats)
    images = args.repeats + 1
    print(f"previews ({PREVIEW_BUDGET:.0%} budget): {without:.3f} s -> {with_previews:.3f} s per image "
          f"({(with_previews / without - 1) * 100:+.1f} %, wall clock); "
          f"{counted.count / images:.1f} previews per image took {counted.seconds / images:.3f} s of it ({counted.seconds / images / without:.1%})")
    step = plain / args.steps
    latencies = [stop_latency(pipe, request, step) for _ in range(args.repeats)]
    print(f"stop: {min(latencies) * 1e3:.1f}-{max(latencies) * 1e3:.1f} ms after the request; a step takes "
          f"{step * 1e3:.1f} ms (whole image {plain:.2f} s), the slowest layer "
          f"{slowest_layer(pipe, request) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
