"""`spd loadcheck`: N concurrent clients for T seconds against a local `spd serve`.

It starts the server (a subprocess on a free 127.0.0.1 port), fills its image cache until the cache
evicts (so memory is measured with the cache full), encodes a few working images, then runs the
clients: each sends new random points for one of those images (`/v1/depth` with an `image_id`) as
fast as answers come. Reports requests/s, latency p50 / p99, errors (anything but 200, or no answer)
and the server's peak resident memory (VmHWM).
"""

from __future__ import annotations

import io
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from spd.errors import UserInputError


@dataclass
class LoadResult:
    clients: int
    seconds: float
    points_per_request: int
    requests: int
    errors: int
    requests_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    server_peak_rss_mb: float
    cache: dict
    first_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (f"{self.clients} clients x {self.seconds:.0f} s, {self.points_per_request} points per request: "
                f"{self.requests} requests, {self.requests_per_s:.1f} requests/s, latency p50 {self.latency_p50_ms:.0f} ms, "
                f"p99 {self.latency_p99_ms:.0f} ms, errors {self.errors}; server peak memory {self.server_peak_rss_mb:.0f} MB "
                f"with the cache full ({self.cache['entries']} images, {self.cache['bytes'] / 2**20:.0f} of "
                f"{self.cache['max_bytes'] / 2**20:.0f} MB, {self.cache['evictions']} evictions)"
                + (f"; first error: {self.first_error}" if self.first_error else ""))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _png(seed: int, height: int, width: int) -> bytes:
    """A smooth random RGB image (content does not change the cost; distinct images do not share cache entries)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    """`spd serve --model MODEL --port PORT EXTRA...` as a subprocess, returned once /healthz answers."""
    command = [sys.executable, "-m", "spd.cli", "serve", "--model", model, "--port", str(port), *extra]
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a long run's output must never block the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return process
        except OSError:
            if process.poll() is not None:
                log.seek(0)
                raise UserInputError(f"spd serve did not start: {' '.join(log.read().split())[-300:]}") from None
            if time.time() > deadline:
                process.kill()
                raise UserInputError("spd serve did not answer /healthz within 300 s") from None
            time.sleep(0.3)


def _status_mb(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status in MiB (VmHWM: peak resident, VmRSS: resident now)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def _rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def fill_cache(client, images: int, height: int, width: int) -> list[str]:
    """Encodes distinct images until the server's cache evicts, then `images` more: their ids."""
    encode = lambda seed: client.post("/v1/encode", files={"image": ("x.png", _png(seed, height, width), "image/png")})  # noqa: E731
    seed = 1000
    while client.get("/v1/info").json()["cache"]["evictions"] == 0:
        encode(seed).raise_for_status()
        seed += 1
    return [encode(i).json()["image_id"] for i in range(images)]


def run_loadcheck(model: str, clients: int = 8, seconds: float = 30.0, points: int = 64, images: int = 3,
                  cache_mb: float = 256.0, height: int = 480, width: int = 640,
                  serve_args: list[str] | None = None) -> LoadResult:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, ["--cache-mb", str(cache_mb), *(serve_args or [])])
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            ids = fill_cache(client, images, height, width)
        result = _drive(url, ids, clients, seconds, points, height, width)
        with httpx.Client(base_url=url, timeout=60) as client:
            cache = client.get("/v1/info").json()["cache"]
        return LoadResult(clients, seconds, points, *result[:2], result[0] / seconds, *result[2:4],
                          _peak_rss_mb(server.pid), cache, result[4])
    finally:
        stop_server(server)


def _drive(url: str, ids: list[str], clients: int, seconds: float, points: int, height: int, width: int):
    """(requests, errors, p50 ms, p99 ms, first error) of `clients` threads for `seconds`."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client_loop(index: int) -> None:
        rng = np.random.default_rng(index)
        with httpx.Client(base_url=url, timeout=120) as client:
            count = 0
            while time.perf_counter() < stop:
                where = rng.uniform([0, 0], [width - 1, height - 1], size=(points, 2)).round(2).tolist()
                start = time.perf_counter()
                try:
                    answer = client.post("/v1/depth", json={"image_id": ids[(index + count) % len(ids)], "points": where})
                    problem = None if answer.status_code == 200 else f"HTTP {answer.status_code}: {answer.text[:200]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))
                count += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not latencies:
        return len(errors), len(errors), float("nan"), float("nan"), errors[0] if errors else None
    cut = statistics.quantiles(latencies, n=100, method="inclusive")
    return (len(latencies) + len(errors), len(errors), statistics.median(latencies), cut[98],
            errors[0] if errors else None)

