"""Load on a real server: `python -m nanodiffusion serve` with a tiny model folder on a free port of
127.0.0.1, 60 txt2img requests at once from threads. Every request is answered, 200 or 429 (with
Retry-After), none lost or hung; progress answers meanwhile; the server is alive afterwards. About 20 s.
"""

import concurrent.futures
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_fakes import save_tiny_model, serve_process  # noqa: E402

NUM_REQUESTS = 60
QUEUE_SIZE = 4
REQUEST_TIMEOUT = 30.0
BODY = {"prompt": "a photo of a cat", "steps": 2, "width": 16, "height": 16, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of a `nanodiffusion serve` process on a free port; the process is killed at the end."""
    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")
    with serve_process("--model", str(folder), "--queue-size", str(QUEUE_SIZE)) as running:
        yield running


def post(url: str, body: dict) -> tuple[int, float, dict, object]:
    """(status, seconds, JSON answer, headers) of a POST; a timeout raises."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as answer:
            return answer.status, time.monotonic() - start, json.load(answer), answer.headers
    except urllib.error.HTTPError as error:
        return error.code, time.monotonic() - start, json.load(error), error.headers


def get(url: str) -> tuple[int, float, dict]:
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as answer:
        return answer.status, time.monotonic() - start, json.load(answer)


def test_concurrent_requests_are_all_answered_200_or_429(server):
    base, process = server
    start = threading.Barrier(NUM_REQUESTS + 1)

    def one(k: int):
        start.wait(REQUEST_TIMEOUT)
        return post(f"{base}/sdapi/v1/txt2img", {**BODY, "seed": k})

    with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(one, k) for k in range(NUM_REQUESTS)]
        start.wait(REQUEST_TIMEOUT)
        progress_latencies = []
        while not all(future.done() for future in futures):          # the server answers meanwhile
            status, seconds, progress = get(f"{base}/sdapi/v1/progress")
            assert status == 200 and 0 <= progress["progress"] <= 1
            progress_latencies.append(seconds)
            time.sleep(0.05)
        results = [future.result(timeout=REQUEST_TIMEOUT) for future in futures]

    statuses = [status for status, *_ in results]
    latencies = [seconds for _, seconds, *_ in results]
    ok = [answer for status, _, answer, _ in results if status == 200]
    refused = [headers for status, _, _, headers in results if status == 429]
    print(f"\nload: {len(results)} requests, {len(ok)} x 200, {len(refused)} x 429, max latency "
          f"{max(latencies):.2f} s, progress polls {len(progress_latencies)} (max "
          f"{max(progress_latencies, default=0):.3f} s)")
    assert len(results) == NUM_REQUESTS and set(statuses) <= {200, 429}, statuses
    assert QUEUE_SIZE + 1 <= len(ok) < NUM_REQUESTS                 # the queue filled, then refused
    assert all(int(headers.get("Retry-After", 0)) >= 1 for headers in refused)
    assert all(len(answer["images"]) == 1 for answer in ok)
    seeds = sorted(json.loads(answer["info"])["seed"] for answer in ok)
    assert len(set(seeds)) == len(ok)                                 # each answer is its own job
    assert process.poll() is None
    assert get(f"{base}/api/info")[0] == 200
    assert post(f"{base}/sdapi/v1/txt2img", BODY)[0] == 200           # and still generates


def test_a_streamed_oversized_body_is_refused_with_413(server):
    base, process = server
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT)
    connection.putrequest("POST", "/sdapi/v1/txt2img")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")              # no Content-Length to check
    connection.endheaders()
    chunk = b"x" * 65536
    try:
        for _ in range(32):                                            # 2 MiB, twice the limit
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass                                                           # the server answered and closed
    assert connection.getresponse().status == 413
    connection.close()
    assert process.poll() is None and get(f"{base}/api/info")[0] == 200
