"""`spd loadcheck --hostile`: the normal load check while other clients misbehave.

Beside the N normal clients (new random points for an encoded image, as fast as answers come) it runs,
for the same T seconds:
- oversized bodies sent chunked (no Content-Length): a multipart upload and a JSON body, each
  `OVERSIZE` times its limit, expected 413;
- pixel bombs: a 6000 x 6000 PNG of ~100 KB (under the pixel cap: decoded, 200 or 503 when the
  decoding queue is full) and an 8000 x 8000 one (over the cap: 413 from its header);
- slow uploads: a small valid PNG (~13 KB) sent in 1 KiB pieces, 50 ms apart;
- large JSON bodies just under the JSON limit (`payloads`): empty objects as points (400) and valid
  points for an unknown image (404), both parsed off the event loop;
- bursts: twice, `BURST` pixel bombs at once, far beyond the decoding queue (503 beyond it);
- a /healthz probe every 50 ms.
It reports the normal clients' errors and latency, /healthz's p99, the hostile answers by class
(2xx, 4xx, 503, other 5xx, dropped), and the server's memory: idle (cache full), peak, and a few
seconds after the mix.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from spd.serve.limits import Limits
from spd.serve.loadcheck import _drive, _png, _rss_mb, _peak_rss_mb, fill_cache, free_port, start_server, stop_server

OVERSIZE = 2  # oversized bodies are this many times their limit
BURST = 40  # uploads at once in each burst
PAUSE_S = 0.25  # each hostile client's pause between requests: hostile content, not a bandwidth flood


@dataclass
class HostileResult:
    clients: int
    seconds: float
    normal_requests: int
    normal_errors: int
    normal_p50_ms: float
    normal_p99_ms: float
    healthz_requests: int
    healthz_p99_ms: float
    hostile_answers: dict  # kind -> {class -> count}
    server_idle_rss_mb: float
    server_peak_rss_mb: float
    server_rss_after_mb: float
    first_normal_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hostile_failures(self) -> int:
        """Hostile requests answered 500 (or another 5xx but 503) or not answered at all."""
        return sum(c.get("5xx", 0) + c.get("dropped", 0) for c in self.hostile_answers.values())

    def format(self) -> str:
        kinds = "; ".join(f"{kind}: " + ", ".join(f"{n} {cls}" for cls, n in sorted(counts.items()))
                          for kind, counts in sorted(self.hostile_answers.items()))
        return (f"hostile mix, {self.seconds:.0f} s: normal clients ({self.clients}) {self.normal_requests} requests, "
                f"{self.normal_errors} errors, p50 {self.normal_p50_ms:.0f} ms, p99 {self.normal_p99_ms:.0f} ms; "
                f"/healthz p99 {self.healthz_p99_ms:.1f} ms over {self.healthz_requests}; hostile answers: {kinds}; "
                f"server memory idle {self.server_idle_rss_mb:.0f} MB, peak {self.server_peak_rss_mb:.0f} MB, "
                f"{self.server_rss_after_mb:.0f} MB after" +
                (f"; first normal error: {self.first_normal_error}" if self.first_normal_error else ""))


def pixel_bomb(side: int) -> bytes:
    """A side x side PNG that compresses to ~100 KB (a few flat bands): cheap to send, costly to decode."""
    bands = np.repeat(np.array([[40, 90, 160], [200, 180, 120], [90, 140, 60]], dtype=np.uint8), side // 3 + 1, 0)
    image = Image.fromarray(np.broadcast_to(bands[:side, None, :], (side, side, 3)).copy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _chunks(total: int, piece: bytes = b"x" * 65536, head: bytes = b""):
    """A body sent chunked: `head`, then `total` bytes in pieces (no Content-Length)."""
    if head:
        yield head
    sent = 0
    while sent < total:
        yield piece[: total - sent]
        sent += len(piece)


class _Tally:
    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}
        self.lock = threading.Lock()

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.counts.setdefault(kind, Counter())[outcome] += 1


def _send(client, tally: _Tally, kind: str, **request) -> None:
    import httpx

    try:
        status = client.post(**request).status_code
        outcome = "2xx" if status < 300 else "503" if status == 503 else "4xx" if status < 500 else "5xx"
    except httpx.HTTPError:
        outcome = "dropped"
    tally.add(kind, outcome)


BOUNDARY = "spdhostile"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
FILE_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode()


def payloads(bomb_side: int, huge_side: int, json_limit: int) -> dict[str, bytes]:
    """What the hostile clients send, made once before the mix (an 8000^2 PNG takes seconds to write): the
    images, and two JSON bodies just under the server's JSON limit: `[{},{},...]` points (~56 ms of
    json.loads and ~70 MiB of Python objects for 3 MiB, 400 once parsed) and as many valid points as fit
    for an unknown image_id (parsed, compacted, 404 from the model's thread)."""
    small = _png(7, 96, 128)  # ~13 KB: ~0.7 s at the slow pace
    head, room = b'{"image_id": "feed", "points": [', json_limit - 64
    empty = head + b"{}," * ((room - len(head)) // 3) + b"{}]}"
    pair = b"[123.25, 45.5],"
    points = head + pair * ((room - len(head)) // len(pair)) + b"[1, 1]]}"
    return {"bomb": pixel_bomb(bomb_side), "huge_bomb": pixel_bomb(huge_side), "small": small,
            "empty_objects": empty, "many_points": points}


def _hostile_loop(url: str, kind: str, stop: float, tally: _Tally, limits: dict, images: dict) -> None:
    import httpx

    head, multipart = FILE_HEAD, MULTIPART
    bomb, huge_bomb, small = images["bomb"], images["huge_bomb"], images["small"]
    with httpx.Client(base_url=url, timeout=120) as client:
        turn = 0
        while time.perf_counter() < stop:
            if kind == "oversized":
                if turn % 2 == 0:
                    _send(client, tally, "oversized multipart (chunked)", url="/v1/encode", headers=multipart,
                          content=_chunks(OVERSIZE * limits["upload"], head=head))
                else:
                    _send(client, tally, "oversized JSON (chunked)", url="/v1/depth",
                          headers={"content-type": "application/json"},
                          content=_chunks(OVERSIZE * limits["json"], piece=b"[1.5, 2.5], " * 5000, head=b'{"points": ['))
            elif kind == "bombs":
                image = bomb if turn % 2 == 0 else huge_bomb
                _send(client, tally, f"pixel bomb {'under' if turn % 2 == 0 else 'over'} the cap",
                      url="/v1/encode", files={"image": ("bomb.png", image, "image/png")})
            elif kind == "large_json":  # bodies just under the JSON limit: parsed off the event loop
                _send(client, tally, f"large JSON {'of empty objects' if turn % 2 == 0 else 'of points'}",
                      url="/v1/depth", headers={"content-type": "application/json"},
                      content=images["empty_objects"] if turn % 2 == 0 else images["many_points"])
            elif kind == "slow":
                body = head + small + f"\r\n--{BOUNDARY}--\r\n".encode()
                _send(client, tally, "slow upload", url="/v1/encode", headers=multipart,
                      content=_slow(body))
            turn += 1
            time.sleep(PAUSE_S)


def _slow(body: bytes, piece: int = 1024, pause: float = 0.05):
    """`body` sent chunked in `piece`-byte parts, `pause` seconds apart."""
    for start in range(0, len(body), piece):
        yield body[start: start + piece]
        time.sleep(pause)


def _burst(url: str, tally: _Tally, bomb: bytes, size: int) -> None:
    import httpx

    def one() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            _send(client, tally, "burst of pixel bombs", url="/v1/encode",
                  files={"image": ("bomb.png", bomb, "image/png")})

    threads = [threading.Thread(target=one) for _ in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _probe_health(url: str, seconds: float) -> list[float]:
    """/healthz latencies [ms] every 50 ms for `seconds` (inf: no answer). Runs in its own process, so
    that the clients' threads do not delay it on the client side."""
    import httpx

    latencies = []
    stop = time.perf_counter() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                client.get("/healthz").raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)
            except httpx.HTTPError:
                latencies.append(float("inf"))
            time.sleep(0.05)
    return latencies


def _misbehave(url: str, seconds: float, limits: dict, sides: tuple[int, int], burst: int) -> dict:
    """Every hostile client and both bursts for `seconds` (in its own process): answers by kind and class."""
    images = payloads(*sides, limits["json"])
    tally = _Tally()
    stop = time.perf_counter() + seconds
    workers = [threading.Thread(target=_hostile_loop, args=(url, kind, stop, tally, limits, images))
               for kind in ("oversized", "bombs", "slow", "large_json")]
    workers += [threading.Timer(seconds * share, _burst, args=(url, tally, images["bomb"], burst)) for share in (0.3, 0.65)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {kind: dict(counts) for kind, counts in tally.counts.items()}


def run_hostile(model: str, clients: int = 8, seconds: float = 30.0, points: int = 64, images: int = 3,
                cache_mb: float = 256.0, serve_args: list[str] | None = None, settle_s: float = 5.0,
                bomb_sides: tuple[int, int] = (6000, 8000), burst: int = BURST) -> HostileResult:
    """The hostile mix against a fresh `spd serve --model MODEL` (cache filled first). The normal clients run
    here, the hostile ones and the /healthz probe each in a process of their own. `bomb_sides`: the pixel
    bombs under and over the server's pixel cap; `burst`: uploads at once in each burst."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, ["--cache-mb", str(cache_mb), *(serve_args or [])])
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            ids = fill_cache(client, images, 480, 640)
            info = client.get("/v1/info").json()["limits"]
        served = Limits(**info)  # the server's own limits, so the oversized bodies are oversized for it
        limits = {"upload": served.max_upload_bytes, "json": served.max_json_bytes}
        idle = _rss_mb(server.pid)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as others:
            others.submit(time.sleep, 0).result()  # both started before the clock runs
            others.submit(time.sleep, 0).result()
            hostile = others.submit(_misbehave, url, seconds, limits, bomb_sides, burst)
            health = others.submit(_probe_health, url, seconds)
            normal = _drive(url, ids, clients, seconds, points, 480, 640)
            hostile, health = hostile.result(), health.result()
        time.sleep(settle_s)
        after = _rss_mb(server.pid)
        health_cut = statistics.quantiles(health, n=100, method="inclusive")[98] if len(health) > 1 else float("nan")
        return HostileResult(clients, seconds, normal[0], normal[1], normal[2], normal[3], len(health), health_cut,
                             hostile, idle, _peak_rss_mb(server.pid), after, normal[4])
    finally:
        stop_server(server)
