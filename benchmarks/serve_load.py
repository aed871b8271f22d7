"""Load test of the ``maskworks serve`` HTTP server, on loopback, against a real server process.

    python benchmarks/serve_load.py                     # default run (about 2-3 minutes on 2 CPU cores)
    python benchmarks/serve_load.py --quick             # smoke run (a few seconds of traffic, no JSON unless --json)
    python benchmarks/serve_load.py --max-concurrency 2 --max-queue 6 --sam-cache 4 --json /tmp/serve.json

The script builds two small random-weight checkpoints in a temporary folder: a semantic ``unet_vanilla`` (features
8-16-32, 4 classes, saved with :func:`maskworks.checkpoint.save_model` and the meta ``maskworks serve`` reads) and a
SAM (``maskworks.testing.TINY_SAM`` with ``--sam-image-size`` / ``--sam-embed-dim``, by default 1024 and 256, so
its image embedding is 256 x 64 x 64 float32 = 4 MiB like SAM ViT-B's and a cache leak shows in the resident
memory; the encoder stays tiny). It starts ``python -m maskworks.cli.main serve --checkpoint ... --sam ...
--host 127.0.0.1 --port <free> --max-concurrency C --max-queue Q --timeout T --sam-cache K`` as a separate process
(torch threads fixed with ``OMP_NUM_THREADS=--threads``), waits for ``GET /health``, and runs (the contract is
/work/notes/serve_contract.md in the development notes):

1. ``below_limit``: ``--clients`` (default C + Q) concurrent clients, threads with one ``httpx.Client`` each, all
   released by one barrier, each sending ``--requests`` ``POST /predict/<model>`` with the same 256 x 256 PNG, one
   after the other. Throughput (answered requests / wall time of the scenario), p50 / p99 latency, and every status
   other than 200 or transport error counted as an error (expected: none). A sequential warm-up before it gives the
   unloaded latency.
2. ``above_limit``: ``--overload`` x (C + Q) clients released at once, each sending ``--burst`` requests back to
   back without retrying. Only 200 and 503 are allowed; every 503 must carry a JSON ``detail`` and a ``Retry-After``
   header; any other status, malformed 503 or transport error is counted as an error (expected: none, and at least
   one 503). Then ``recovery``: C + Q concurrent requests once more must all be 200 (a slot leaked by a rejected
   or finished request would show as 503s here).
3. ``sam_memory``: ``--sam-images`` distinct images (default 8 x the cache size) through ``POST /sam/embed``, each
   followed by a ``POST /sam/predict`` click; the server's resident memory (psutil on its pid, children included)
   before any SAM traffic, after the warm-up (the first K images: the cache is full) and after every image. With
   an LRU of K embeddings the growth after the warm-up should stay near 0 (and the least-squares slope of RSS over
   the images near 0 MiB per image), far below the ``(images - K) x embedding bytes`` an unbounded cache would add
   (a slope of one embedding per image); the bound a full cache holds is ``K x embedding bytes``. Checked: growth
   at most ``max(K x embedding, half the unbounded growth)``; the oldest ``image_id`` is evicted
   (``/sam/predict`` -> 404); the newest is still cached (re-embedding it answers ``cached: true``).

Each scenario also records the CPU seconds the server and this process used over its wall time, and the server's
peak resident memory (sampled every 0.2 s); at the end the server log is scanned for tracebacks, ``ERROR`` lines
and 500s (expected: none).

A watchdog ends the whole run after ``--deadline`` seconds, every request has a timeout, every thread join has a
limit, and the server process is stopped (SIGTERM, then SIGKILL) at the end, on errors and on Ctrl-C (SIGKILL and
exit status 3 when the deadline ends the run). The client threads run in this process and share the machine's
cores with the server: the numbers are those of a loopback test on one machine, not of a server with the cores to
itself. Writes ``benchmarks/results/serve_load.json`` (``--json``); exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"
CLASS_NAMES = ["background", "square", "disc", "stripe"]
PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200]]


# -- inputs -----------------------------------------------------------------------------------------------------------


def png_bytes(seed: int, size: int = 256) -> bytes:
    """A ``size`` x ``size`` RGB PNG of a few flat shapes on noise, different for every ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = (rng.random((size, size, 3)) * 80).astype(np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size - size // 4, 2)
        image[y : y + size // 5, x : x + size // 5] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def build_checkpoints(folder: Path, sam_image_size: int, sam_embed_dim: int) -> tuple[Path, Path, int]:
    """The semantic and SAM checkpoints; returns their paths and the bytes of one SAM image embedding."""
    import torch

    from maskworks import create_model
    from maskworks.checkpoint import save_model
    from maskworks.testing import TINY_SAM, perturb_parameters

    torch.manual_seed(0)
    unet = create_model("unet_vanilla", in_channels=3, num_classes=len(CLASS_NAMES), features=(8, 16, 32)).eval()
    meta = {
        "class_names": CLASS_NAMES,
        "palette": PALETTE,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "in_channels": 3,
        "num_classes": len(CLASS_NAMES),
        "task": "semantic",
    }
    semantic = save_model(unet, folder / "unet", meta)
    config = {**TINY_SAM, "image_size": sam_image_size, "prompt_embed_dim": sam_embed_dim}
    # weights off their initialisation (LayerNorms at 1 / 0 give degenerate masks), as the SAM tests do
    sam = perturb_parameters(create_model("sam_vit_base", **config), seed=0, scale=0.05).eval()
    sam_path = save_model(sam, folder / "sam", {"task": "promptable"})
    grid = sam_image_size // 16
    return semantic, sam_path, sam_embed_dim * grid * grid * 4


# -- the server process -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``maskworks serve`` in a child process of its own session; :meth:`stop` ends it (and only it)."""

    def __init__(self, argv: list[str], env: dict, log_path: Path):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, base: str, timeout: float) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before /health answered:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{base}/health", timeout=2.0)
                if r.status_code == 200:
                    return r.json()
                last = f"status {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(0.25)
        raise RuntimeError(f"/health did not answer 200 within {timeout:.0f} s (last: {last}):\n{self.log_tail()}")

    def rss_mib(self) -> float | None:
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
            return sum(q.memory_info().rss for q in procs) / 2**20
        except psutil.Error:
            return None

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the server process and its children so far."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            return sum(sum(q.cpu_times()[:2]) for q in [p, *p.children(recursive=True)])
        except psutil.Error:
            return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


class RssSampler(threading.Thread):
    """Samples the server's resident memory every ``interval`` seconds; ``peak(t0, t1)`` of a phase."""

    def __init__(self, server: Server, interval: float = 0.2):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = self.server.rss_mib()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def peak(self, t0: float, t1: float) -> float | None:
        values = [rss for t, rss in list(self.samples) if t0 <= t <= t1]
        return max(values) if values else None


# -- clients ----------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_clients(n: int, work, timeout: float, join_timeout: float) -> tuple[list, float, int]:
    """Run ``work(i, client)`` in ``n`` threads released together (``timeout``: of one request); returns (their
    results, wall seconds from the release to the last finish, threads still running after ``join_timeout``)."""
    import httpx

    barrier = threading.Barrier(n + 1)
    results: list = [None] * n

    def body(i: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                results[i] = [{"error": "barrier broken"}]
                return
            results[i] = work(i, client)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    t0 = time.perf_counter()
    deadline = time.monotonic() + join_timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)
    return results, wall, hung


def predict_once(client, url: str, image: bytes) -> dict:
    import httpx

    t0 = time.perf_counter()
    try:
        r = client.post(url, files={"image": ("image.png", image, "image/png")})
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}", "latency": time.perf_counter() - t0}
    out = {"status": r.status_code, "latency": time.perf_counter() - t0}
    if r.status_code != 200:
        out["retry_after"] = r.headers.get("retry-after")
        try:
            body = r.json()
            out["detail"] = body.get("detail") if isinstance(body, dict) else None
        except ValueError:
            out["detail"] = None
            out["body"] = r.text[:200]
    return out


def summarize(rows: list[dict], wall: float | None = None) -> dict:
    ok = [r for r in rows if r.get("status") == 200]
    lat_ms = [1e3 * r["latency"] for r in ok]
    statuses: dict[str, int] = {}
    for r in rows:
        key = str(r["status"]) if "status" in r else "transport error"
        statuses[key] = statuses.get(key, 0) + 1
    out = {
        "requests": len(rows),
        "ok": len(ok),
        "statuses": statuses,
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "max_ms": max(lat_ms) if lat_ms else None,
    }
    if wall is not None:
        out["wall_s"] = wall
        out["throughput_rps"] = len(ok) / wall if wall > 0 else None
    errors = [r for r in rows if "error" in r]
    if errors:
        out["transport_errors"] = sorted({r["error"][:160] for r in errors})[:5]
    return out


def scenario_below(base: str, model: str, image: bytes, clients: int, requests: int, timeout: float) -> dict:
    url = f"{base}/predict/{model}"

    def work(i, client):
        return [predict_once(client, url, image) for _ in range(requests)]

    results, wall, hung = run_clients(clients, work, timeout, timeout * requests + 30)
    rows = [r for rs in results if rs for r in rs]
    out = {"clients": clients, "requests_per_client": requests, **summarize(rows, wall), "hung_clients": hung}
    out["errors"] = out["requests"] - out["ok"] + hung * requests + sum(rs is None for rs in results) * requests
    return out


def scenario_above(base: str, model: str, image: bytes, clients: int, burst: int, timeout: float) -> dict:
    url = f"{base}/predict/{model}"

    def work(i, client):
        return [predict_once(client, url, image) for _ in range(burst)]

    results, wall, hung = run_clients(clients, work, timeout, timeout * burst + 30)
    rows = [r for rs in results if rs for r in rs]
    rejected = [r for r in rows if r.get("status") == 503]
    bad_503 = [r for r in rejected if not (isinstance(r.get("detail"), str) and r["detail"] and r.get("retry_after"))]
    other = [r for r in rows if r.get("status") not in (200, 503)]
    out = {"clients": clients, "requests_per_client": burst, **summarize(rows, wall), "hung_clients": hung}
    out["rejected_503"] = len(rejected)
    out["reject_p50_ms"] = percentile([1e3 * r["latency"] for r in rejected], 50)
    out["503_without_detail_or_retry_after"] = len(bad_503)
    out["retry_after_values"] = sorted({str(r.get("retry_after")) for r in rejected})
    out["503_detail_example"] = rejected[0].get("detail") if rejected else None
    if other:
        out["unexpected_examples"] = [{k: r.get(k) for k in ("status", "detail", "body", "error")} for r in other[:3]]
    out["errors"] = len(other) + len(bad_503) + hung * burst + sum(rs is None for rs in results) * burst
    return out


# -- SAM --------------------------------------------------------------------------------------------------------------


def scenario_sam(base: str, server: Server, n_images: int, cache: int, embed_bytes: int, timeout: float) -> dict:
    import httpx

    problems: list[str] = []
    series: list[dict] = []
    embed_ms: list[float] = []
    predict_ms: list[float] = []
    ids: list[str] = []
    statuses: dict[str, int] = {}

    def count(status) -> None:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    rss_before = server.rss_mib()
    rss_warm = None
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        for i in range(n_images):
            image = png_bytes(1000 + i)
            t0 = time.perf_counter()
            r = client.post(f"{base}/sam/embed", files={"image": (f"sam{i}.png", image, "image/png")})
            embed_ms.append(1e3 * (time.perf_counter() - t0))
            count(r.status_code)
            if r.status_code != 200:
                problems.append(f"/sam/embed of image {i}: status {r.status_code}: {r.text[:160]}")
                break
            body = r.json()
            ids.append(body["image_id"])
            if body.get("cached"):
                problems.append(f"/sam/embed of the new image {i} answered cached: true")
            x, y = body["width"] // 3 + i % 7, body["height"] // 2
            t0 = time.perf_counter()
            r = client.post(
                f"{base}/sam/predict",
                json={"image_id": body["image_id"], "points": [[x, y]], "labels": [1], "box": None, "multimask": True},
            )
            predict_ms.append(1e3 * (time.perf_counter() - t0))
            count(r.status_code)
            if r.status_code != 200:
                problems.append(f"/sam/predict on image {i}: status {r.status_code}: {r.text[:160]}")
            else:
                masks = r.json().get("masks") or []
                if not masks:
                    problems.append(f"/sam/predict on image {i} returned no masks")
            rss = server.rss_mib()
            series.append({"images": i + 1, "rss_mib": rss})
            if i + 1 == cache:
                rss_warm = rss
        # the oldest embedding must be gone, the newest still there
        if len(ids) > cache:
            r = client.post(f"{base}/sam/predict", json={"image_id": ids[0], "points": [[5, 5]], "labels": [1]})
            count(r.status_code)
            evicted_status = r.status_code
            if r.status_code != 404:
                problems.append(f"/sam/predict on the evicted image_id {ids[0]} answered {r.status_code}, not 404")
        else:
            evicted_status = None
        cached_again = None
        if ids:
            r = client.post(
                f"{base}/sam/embed", files={"image": ("again.png", png_bytes(1000 + len(ids) - 1), "image/png")}
            )
            count(r.status_code)
            cached_again = r.status_code == 200 and bool(r.json().get("cached"))
            if not cached_again:
                problems.append(f"re-embedding the newest image did not answer cached: true ({r.text[:160]})")
    rss_after = server.rss_mib()
    mib = embed_bytes / 2**20
    growth = None if rss_warm is None or rss_after is None else rss_after - rss_warm
    unbounded = max(0, len(ids) - cache) * mib
    after_warm = [s["rss_mib"] for s in series[cache:] if s["rss_mib"] is not None]
    tail = [(s["images"], s["rss_mib"]) for s in series[cache - 1 :] if s["rss_mib"] is not None]
    # least-squares RSS growth per image once the cache is full: about embedding_mib for a cache that never evicts
    slope = float(np.polyfit(*zip(*tail), 1)[0]) if len(tail) >= 3 else None
    out = {
        "images": len(ids),
        "cache_size": cache,
        "embedding_mib": mib,
        "cache_bound_mib": cache * mib,
        "unbounded_growth_mib": unbounded,
        "rss_before_mib": rss_before,
        "rss_after_warmup_mib": rss_warm,
        "rss_after_mib": rss_after,
        "rss_max_after_warmup_mib": max(after_warm) if after_warm else None,
        "growth_after_warmup_mib": growth,
        "slope_after_warmup_mib_per_image": slope,
        "warmup_growth_mib": None if rss_warm is None or rss_before is None else rss_warm - rss_before,
        "embed_p50_ms": percentile(embed_ms, 50),
        "predict_p50_ms": percentile(predict_ms, 50),
        "statuses": statuses,
        "evicted_predict_status": evicted_status,
        "newest_cached_again": cached_again,
        "series": series,
    }
    # bounded: growing less than half of what keeping every embedding would add (and never beyond the cache bound)
    if growth is not None and unbounded > 0 and growth > max(0.5 * unbounded, cache * mib):
        problems.append(
            f"server RSS grew {growth:.1f} MiB after the cache was full; an unbounded cache would add "
            f"{unbounded:.1f} MiB, the LRU bound is {cache * mib:.1f} MiB"
        )
    out["problems"] = problems
    out["errors"] = len(problems)
    return out


# -- report -----------------------------------------------------------------------------------------------------------


def _f(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def print_table(result: dict) -> None:
    s = result["scenarios"]
    print("\n| scenario | clients x requests | 200 | 503 | errors | req/s | p50 ms | p99 ms | server CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("unloaded", "below_limit", "above_limit", "recovery"):
        r = s.get(name)
        if r is None:
            continue
        cpu = "-"
        if r.get("server_cpu_s") is not None and r.get("phase_wall_s"):
            cpu = f"{100 * r['server_cpu_s'] / r['phase_wall_s']:.0f}%"
        print(
            f"| {name} | {r.get('clients', 1)} x {r.get('requests_per_client', r['requests'])} | {r['ok']} | "
            f"{r['statuses'].get('503', 0)} | {r.get('errors', 0)} | {_f(r.get('throughput_rps'), '.2f')} | "
            f"{_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {cpu} |"
        )
    m = s.get("sam_memory")
    if m:
        print(
            "\n| SAM images | cache | embedding MiB | RSS before | after warm-up | after | growth after warm-up | "
            "slope MiB/image | LRU bound | unbounded would add | embed p50 ms | click p50 ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {m['images']} | {m['cache_size']} | {m['embedding_mib']:.2f} | {_f(m['rss_before_mib'])} | "
            f"{_f(m['rss_after_warmup_mib'])} | {_f(m['rss_after_mib'])} | {_f(m['growth_after_warmup_mib'], '+.1f')} | "
            f"{_f(m['slope_after_warmup_mib_per_image'], '+.2f')} | "
            f"{m['cache_bound_mib']:.1f} | {m['unbounded_growth_mib']:.1f} | {_f(m['embed_p50_ms'])} | "
            f"{_f(m['predict_p50_ms'])} |"
        )
    if result["problems"]:
        print("\nproblems:")
        for p in result["problems"]:
            print(f"  - {p}")
    else:
        print("\nall checks passed")


# -- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few clients, requests and SAM images")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads of the server")
    p.add_argument("--max-concurrency", type=int, default=2, help="server --max-concurrency (C)")
    p.add_argument("--max-queue", type=int, default=6, help="server --max-queue (Q)")
    p.add_argument("--timeout", type=float, default=60.0, help="server --timeout per request (s)")
    p.add_argument("--sam-cache", type=int, default=4, help="server --sam-cache (K embeddings)")
    p.add_argument("--clients", type=int, help="scenario 1 concurrent clients (default C + Q)")
    p.add_argument("--requests", type=int, help="scenario 1 requests per client (default 50, quick 2)")
    p.add_argument("--overload", type=float, default=3.0, help="scenario 2 clients = overload x (C + Q)")
    p.add_argument("--burst", type=int, help="scenario 2 requests per client (default 4, quick 1)")
    p.add_argument("--sam-images", type=int, help="scenario 3 distinct images (default 8 x the cache size)")
    p.add_argument("--sam-image-size", type=int, default=1024, help="SAM input side (embedding grid = side / 16)")
    p.add_argument("--sam-embed-dim", type=int, default=256, help="SAM embedding channels")
    p.add_argument("--size", type=int, default=256, help="side of the PNG sent to /predict")
    p.add_argument("--scenarios", nargs="+", default=["below", "above", "sam"], choices=["below", "above", "sam"])
    p.add_argument("--request-timeout", type=float, default=120.0, help="client timeout of one request (s)")
    p.add_argument("--deadline", type=float, help="the whole run is ended after this many seconds (default 600)")
    p.add_argument("--json", help="results file (default benchmarks/results/serve_load.json; none with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.clients = args.clients or 3
        args.requests = args.requests or 2
        args.burst = args.burst or 1
        args.overload = min(args.overload, 2.0)
        args.sam_images = args.sam_images or args.sam_cache + 2
        args.sam_image_size = min(args.sam_image_size, 256)
        args.deadline = args.deadline or 180
    else:
        args.json = args.json or str(RESULTS)
    slots = args.max_concurrency + args.max_queue
    args.clients = args.clients or slots
    args.requests = args.requests or 50
    args.burst = args.burst or 4
    args.sam_images = args.sam_images or 8 * args.sam_cache
    args.deadline = args.deadline or 600
    if args.clients > slots:
        p.error(f"--clients {args.clients} exceeds C + Q = {slots}: scenario 1 stays below the limit")
    return args


def run(args, folder: Path, holder: dict, argv) -> dict:
    """Build the checkpoints, start the server (kept in ``holder["server"]``), run the scenarios; the result."""
    import httpx

    from maskworks.bench import machine_info

    semantic, sam_path, embed_bytes = build_checkpoints(folder, args.sam_image_size, args.sam_embed_dim)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv_server = [
        sys.executable,
        "-m",
        "maskworks.cli.main",
        "serve",
        "--checkpoint",
        str(semantic),
        "--sam",
        str(sam_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-concurrency",
        str(args.max_concurrency),
        "--max-queue",
        str(args.max_queue),
        "--timeout",
        str(args.timeout),
        "--sam-cache",
        str(args.sam_cache),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print("server:", shlex.join(argv_server), flush=True)
    t_start = time.perf_counter()
    server = holder["server"] = Server(argv_server, env, folder / "server.log")
    health = server.wait_healthy(base, timeout=120)
    startup_s = time.perf_counter() - t_start
    models = health.get("models") or []
    if not models:
        raise RuntimeError(f"/health lists no model: {health}")
    model = models[0]
    print(f"healthy after {startup_s:.1f} s: {health}", flush=True)
    sampler = holder["sampler"] = RssSampler(server)
    sampler.start()
    image = png_bytes(0, args.size)
    scenarios: dict = {}
    problems: list[str] = []
    rss_idle = server.rss_mib()

    # sequential warm-up: the unloaded latency (the first request left out), and a look at one answer
    with httpx.Client(timeout=args.request_timeout) as client:
        first = client.post(f"{base}/predict/{model}", files={"image": ("i.png", image, "image/png")})
        rows = [predict_once(client, f"{base}/predict/{model}", image) for _ in range(3 if args.quick else 8)]
        limits = client.get(f"{base}/models").json().get("limits")
    scenarios["unloaded"] = {"clients": 1, "requests_per_client": len(rows), **summarize(rows)}
    scenarios["unloaded"]["errors"] = len(rows) - scenarios["unloaded"]["ok"]
    if first.status_code != 200:
        problems.append(f"first /predict/{model} answered {first.status_code}: {first.text[:200]}")
    else:
        body = first.json()
        if (body.get("width"), body.get("height")) != (args.size, args.size) or "label_png" not in body:
            problems.append(f"/predict/{model} answer lacks the contract's fields: {sorted(body)}")
        else:
            from PIL import Image

            label = Image.open(io.BytesIO(base64.b64decode(body["label_png"])))
            if label.size != (args.size, args.size):
                problems.append(f"label_png is {label.size}, the image {args.size}x{args.size}")
    if scenarios["unloaded"]["errors"]:
        problems.append(f"unloaded sequential requests: statuses {scenarios['unloaded']['statuses']}")
    print("unloaded:", json.dumps(scenarios["unloaded"]), flush=True)

    slots = args.max_concurrency + args.max_queue
    phases: dict[str, tuple[float, float]] = {}

    def phase(name: str, fn, *fn_args) -> dict:
        """Run one scenario; add the server's and this process's CPU seconds over its wall time."""
        t0, server_cpu, client_cpu = time.monotonic(), server.cpu_s(), time.process_time()
        r = fn(*fn_args)
        t1 = time.monotonic()
        phases[name] = (t0, t1)
        server_cpu_end = server.cpu_s()
        if server_cpu is not None and server_cpu_end is not None:
            r["server_cpu_s"] = server_cpu_end - server_cpu
        r["client_cpu_s"] = time.process_time() - client_cpu
        r["phase_wall_s"] = t1 - t0
        scenarios[name] = r
        print(f"{name}:", json.dumps({k: v for k, v in r.items() if k != "series"}), flush=True)
        return r

    if "below" in args.scenarios:
        r = phase("below_limit", scenario_below, base, model, image, args.clients, args.requests, args.request_timeout)
        if r["errors"]:
            problems.append(
                f"below the limit ({r['clients']} clients <= C + Q = {slots}): {r['errors']} "
                f"errors, statuses {r['statuses']}"
            )
    if "above" in args.scenarios:
        n = max(slots + 1, round(args.overload * slots))
        r = phase("above_limit", scenario_above, base, model, image, n, args.burst, args.request_timeout)
        if r["errors"]:
            problems.append(
                f"above the limit: {r['errors']} errors (statuses {r['statuses']}, 503s without "
                f"detail / Retry-After: {r['503_without_detail_or_retry_after']}, "
                f"hung clients: {r['hung_clients']})"
            )
        if r["rejected_503"] == 0:
            problems.append(
                f"above the limit: {n} clients x {args.burst} requests at once against C + Q = {slots} slots got no 503"
            )
        # no slot leaked: C + Q at once must all be served again
        time.sleep(0.5)
        r = phase("recovery", scenario_below, base, model, image, slots, 1, args.request_timeout)
        if r["errors"]:
            problems.append(
                f"after the overload, {slots} concurrent requests (= C + Q) got {r['errors']} "
                f"errors, statuses {r['statuses']}: slots not released?"
            )
    if "sam" in args.scenarios:
        if not health.get("sam"):
            problems.append("/health says sam: false although --sam was given")
        else:
            r = phase(
                "sam_memory",
                scenario_sam,
                base,
                server,
                args.sam_images,
                args.sam_cache,
                embed_bytes,
                args.request_timeout,
            )
            problems += [f"SAM: {p}" for p in r["problems"]]
    if server.proc.poll() is not None:
        problems.append(f"the server exited during the run (code {server.proc.returncode})")
    sampler.stop()
    for name, (t0, t1) in phases.items():
        scenarios[name]["server_rss_peak_mib"] = sampler.peak(t0, t1)
    tmp = str(folder)
    result = {
        "machine": machine_info("cpu"),
        "threads": args.threads,
        "load_average_at_end": os.getloadavg(),
        "command": shlex.join(["python", "benchmarks/serve_load.py", *(sys.argv[1:] if argv is None else argv)]),
        "server_command": shlex.join(["maskworks", *argv_server[3:]]).replace(tmp, "<tmp>"),
        "settings": {
            "max_concurrency": args.max_concurrency,
            "max_queue": args.max_queue,
            "timeout_s": args.timeout,
            "sam_cache": args.sam_cache,
            "image": [args.size, args.size],
            "semantic_model": "unet_vanilla features (8, 16, 32), 4 classes, random weights",
            "sam_model": f"TINY_SAM with image_size {args.sam_image_size}, prompt_embed_dim {args.sam_embed_dim}, "
            "random weights",
            "limits_reported_by_server": limits,
        },
        "startup_s": startup_s,
        "server_rss_idle_mib": rss_idle,
        "server_rss_peak_mib": max((v for _, v in sampler.samples), default=None),
        "scenarios": scenarios,
        "problems": problems,
    }
    result["server_exit_code"] = server.stop()
    if result["server_exit_code"] not in (0, -signal.SIGTERM):
        problems.append(f"the server exited with code {result['server_exit_code']} on SIGTERM")
    log_text = server.log_path.read_text(errors="replace")
    log_lines = log_text.splitlines()
    bad = [line for line in log_lines if "Traceback" in line or " 500 " in line or "ERROR" in line]
    result["server_log_lines"] = len(log_lines)
    result["server_log_errors"] = len(bad)
    if bad:
        problems.append(f"the server log has {len(bad)} error line(s), e.g. {bad[0][:200]!r}")
    result["server_log_tail"] = server.log_tail(15).replace(tmp, "<tmp>")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    holder: dict = {}

    def stop_all() -> None:
        if holder.get("sampler") is not None:
            holder["sampler"].stop()
        if holder.get("server") is not None:
            holder["server"].stop()

    def watchdog() -> None:
        print(f"serve_load: deadline of {args.deadline:.0f} s reached, killing the server", file=sys.stderr, flush=True)
        server = holder.get("server")
        if server is not None and server.proc.poll() is None:
            server.proc.kill()  # at once: the main thread is still running requests
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=10)
        if holder.get("folder") is not None:
            shutil.rmtree(holder["folder"], ignore_errors=True)
        os._exit(3)

    timer = threading.Timer(args.deadline, watchdog)
    timer.daemon = True
    timer.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
            holder["folder"] = tmp
            try:
                result = run(args, Path(tmp), holder, argv)
            except BaseException:
                if holder.get("server") is not None:
                    print("server log (tail):\n" + holder["server"].log_tail(), file=sys.stderr)
                raise
            finally:
                stop_all()
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    result["load_average_at_start"] = load
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
