"""The HTTP app of ``maskworks serve``: a REST API over loaded checkpoints (and SAM) plus a web page.

Endpoints (OpenAPI docs at ``/docs``):

- ``GET /health``: liveness, the loaded models, whether SAM is loaded (never needs the token).
- ``GET /models``: name, task, classes, palette and input size of each model; SAM's settings; the limits.
- ``POST /predict/{model}``: a multipart image -> semantic label PNG + per-class pixel shares, instance COCO
  results with RLE, or panoptic id PNG + segments; options for tiling, TTA and probability / entropy maps.
- ``POST /sam/embed``: a multipart image -> an image id (the embedding stays in a bounded LRU cache).
- ``POST /sam/predict``: points, labels and / or a box on an embedded image -> masks and predicted IoUs.
- ``GET /``: the web page (plain HTML + JavaScript from the package, no build step).

Safety: the app only serves the models it was created with, never a path from a request; uploads are bounded in
bytes (checked while the body streams in) and in pixels (checked from the image header before decoding); the part
must declare an image content type and decode completely; at most ``max_concurrency`` requests run (in worker
threads, off the event loop) and ``max_queue`` wait, anything beyond gets 503 with ``Retry-After``; a request that
takes longer than ``timeout_s`` gets 504 (its worker keeps its slot until it finishes, so the bound holds); every
error is JSON ``{"detail": "..."}``; with a token, the API needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, Field

from maskworks.serve.images import UploadError, check_content_type
from maskworks.serve.runtime import PredictOptions, SamService, ServedModel

__all__ = ["ServeSettings", "create_app"]

T = TypeVar("T")

# multipart framing and the small form fields around the image
_FORM_OVERHEAD = 1 << 20
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}


@dataclass
class ServeSettings:
    """Limits and access of the server.

    Attributes:
        token: bearer token the API requires (``None``: open; bind to loopback then).
        max_upload_bytes: largest accepted image file.
        max_pixels: largest accepted image (width x height), checked before decoding.
        max_concurrency: requests computed at once (each in a worker thread).
        max_queue: requests waiting for a worker; more get 503.
        timeout_s: per-request time limit (queue wait + compute); over it, 504.
    """

    token: str | None = None
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_concurrency: int = 1
    max_queue: int = 8
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty")

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "token"}


class Limiter:
    """At most ``concurrency`` jobs in worker threads, at most ``queue`` waiting; more are refused (503)."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency, self.queue = concurrency, queue
        self.pending = 0  # admitted and not finished: running + waiting (only touched on the event loop)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="maskworks-serve")
        self._sem: asyncio.Semaphore | None = None

    @property
    def full(self) -> bool:
        return self.pending >= self.concurrency + self.queue

    def busy(self) -> HTTPException:
        return HTTPException(
            503,
            detail=f"server busy: {self.pending} request(s) running or waiting (at most {self.concurrency} "
            f"running + {self.queue} waiting); retry shortly",
            headers={"Retry-After": "1"},
        )

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        if self.full:
            raise self.busy()
        loop = asyncio.get_running_loop()
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        sem = self._sem
        deadline = loop.time() + timeout
        self.pending += 1
        try:
            await asyncio.wait_for(sem.acquire(), timeout)
        except asyncio.TimeoutError:
            self.pending -= 1
            raise HTTPException(
                504, detail=f"the request waited {timeout:g} s for a free worker (the server's time limit)"
            ) from None
        except BaseException:  # cancelled: the client went away while waiting
            self.pending -= 1
            raise

        def finished(_: Any) -> None:  # the slot is freed when the work ends, even after a 504
            sem.release()
            self.pending -= 1

        future = loop.run_in_executor(self._executor, fn, *args)
        future.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(deadline - loop.time(), 1e-3))
        except asyncio.TimeoutError:
            raise HTTPException(
                504,
                detail=f"the request took longer than the server's time limit of {timeout:g} s; try a smaller "
                "image or fewer options (tiles, TTA)",
            ) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SamPrompt(BaseModel):
    """Prompts on an embedded image, in original image pixels."""

    image_id: str = Field(..., min_length=1, max_length=64, description="the id returned by POST /sam/embed")
    points: list[tuple[float, float]] = Field(default_factory=list, max_length=64, description="[[x, y], ...]")
    labels: list[int] = Field(default_factory=list, max_length=64, description="1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1]")
    multimask: bool | None = Field(None, description="three candidates (default: for a single point)")


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The web page's files, read once from the package: a fixed table, so request paths never reach the disk."""
    table: dict[str, tuple[bytes, str]] = {}
    root = resources.files("maskworks.serve") / "static"
    if root.is_dir():
        for entry in root.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
            if entry.is_file() and suffix in _STATIC_TYPES:
                table[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return table


class _BodyLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes, from ``Content-Length`` before reading and
    while streaming otherwise (413, JSON); and refuse work requests while the queue is full before their body is
    read (503), so an overloaded server does not parse uploads it will not serve."""

    def __init__(self, app: Any, limit: int, upload_limit: int, limiter: Limiter | None = None):
        self.app, self.limit, self.upload_limit, self.limiter = app, limit, upload_limit, limiter

    def _message(self, size: str) -> str:
        return f"the request body is {size}, above this server's upload limit of {self.upload_limit} bytes"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    response = JSONResponse({"detail": self._message(f"{declared} bytes")}, status_code=413)
                    await response(scope, receive, send)
                    return
        path = scope.get("path", "")
        if (
            self.limiter is not None
            and self.limiter.full
            and scope.get("method") == "POST"
            and (path.startswith("/predict/") or path.startswith("/sam/"))
        ):
            busy = self.limiter.busy()
            await JSONResponse({"detail": busy.detail}, status_code=503, headers=busy.headers)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, detail=self._message(f"more than {self.limit} bytes"))
            return message

        await self.app(scope, limited, send)


def create_app(
    models: Mapping[str, ServedModel] | Iterable[ServedModel] = (),
    sam: SamService | None = None,
    settings: ServeSettings | None = None,
) -> FastAPI:
    """The FastAPI app serving ``models`` (by name) and optionally ``sam``.

    Raises:
        ValueError: no model and no SAM, or two models with the same name.
    """
    from maskworks import __version__

    settings = settings or ServeSettings()
    if isinstance(models, Mapping):
        table = dict(models)
    else:
        table = {}
        for m in models:
            if m.name in table:
                raise ValueError(f"two models are named {m.name!r}; give them distinct names")
            table[m.name] = m
    if not table and sam is None:
        raise ValueError("nothing to serve: give at least one model or SAM")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < settings.max_pixels:
        Image.MAX_IMAGE_PIXELS = settings.max_pixels  # our own limit (checked from the header) decides
    limiter = Limiter(settings.max_concurrency, settings.max_queue)
    static = _static_files()
    bearer = HTTPBearer(auto_error=False, description="the token given to `maskworks serve --token`")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                detail="this server needs a token: send the header 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise HTTPException(401, detail="wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        limiter.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="maskworks serve",
        version=__version__,
        description="Image segmentation over HTTP: semantic, instance and panoptic checkpoints, and SAM prompts. "
        'Errors are JSON {"detail": "..."}.',
    )
    app.state.models, app.state.sam, app.state.settings, app.state.limiter = table, sam, settings, limiter
    app.add_middleware(
        _BodyLimit,
        limit=settings.max_upload_bytes + _FORM_OVERHEAD,
        upload_limit=settings.max_upload_bytes,
        limiter=limiter,
    )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(v) for v in err.get("loc", ()) if v not in ("body", "query", "path", "form")]
            parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    async def read_upload(image: UploadFile) -> bytes:
        check_content_type(image.content_type)
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise UploadError(
                413, f"the image is larger than this server's upload limit of {settings.max_upload_bytes} bytes"
            )
        return data

    async def guarded(fn: Callable[..., T], *args: Any) -> T:
        try:
            return await limiter.run(fn, *args, timeout=settings.timeout_s)
        except UploadError as e:
            raise HTTPException(e.status, detail=e.message) from None

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    # ------------------------------------------------------------------------------------------------ page
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        if "index.html" not in static:
            return HTMLResponse("<h1>maskworks serve</h1><p>The web page is not installed; see /docs.</p>")
        body, media = static["index.html"]
        return Response(body, media_type=media)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:  # a lookup in a fixed table: the name never becomes a path
            raise HTTPException(404, detail=f"no static file {name!r}")
        body, media = static[name]
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------------------------------------- api
    @app.get("/health", summary="Liveness and what is loaded")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": list(table),
            "sam": sam is not None,
            "version": __version__,
            "pending": limiter.pending,
        }

    @app.get("/models", summary="The models this server answers", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return {
            "models": [m.info() for m in table.values()],
            "sam": sam.info() if sam is not None else None,
            "limits": settings.public(),
        }

    @app.post(
        "/predict/{model}",
        summary="Segment an uploaded image",
        dependencies=[Depends(authorize)],
        responses={200: {"content": {"image/png": {}}, "description": "JSON result, or the label PNG (?format=png)"}},
    )
    async def predict(
        model: str,
        image: UploadFile = File(..., description="the image (PNG, JPEG, TIFF, BMP, WebP)"),
        tile: int | None = Form(None, description="sliding-window size in pixels (>= 8); default whole image"),
        overlap: float = Form(0.25, description="tile overlap in [0, 1)"),
        tta: str | None = Form(None, description="test-time augmentation preset (flip, d4, ms_flip, ...)"),
        probabilities: bool = Form(False, description="semantic: add one 8-bit probability PNG per class"),
        entropy: bool = Form(False, description="semantic: add the normalised entropy as an 8-bit PNG"),
        threshold: float = Form(0.5, description="binary models: foreground where p > threshold"),
        score_threshold: float = Form(0.5, description="instance models: least score kept"),
        format: str = Query("json", description="json, or png for a semantic model's label PNG alone"),
    ) -> Response:
        from maskworks.inference import TTA_PRESETS

        served = table.get(model)
        if served is None:
            known = ", ".join(sorted(table)) or "none"
            raise HTTPException(404, detail=f"no model named {model!r}; this server has: {known}")
        problems = []
        if tile is not None and tile < 8:
            problems.append(f"tile must be at least 8 pixels, got {tile}")
        if not 0 <= overlap < 1:
            problems.append(f"overlap must be in [0, 1), got {overlap}")
        if tta is not None and tta not in TTA_PRESETS:
            problems.append(f"tta must be one of {', '.join(TTA_PRESETS)}, got {tta!r}")
        if not 0 < threshold < 1:
            problems.append(f"threshold must be in (0, 1), got {threshold}")
        if not 0 <= score_threshold <= 1:
            problems.append(f"score_threshold must be in [0, 1], got {score_threshold}")
        if format not in ("json", "png"):
            problems.append(f"format must be json or png, got {format!r}")
        elif format == "png" and served.kind != "semantic":
            problems.append(f"format=png is for semantic models; {model!r} is a {served.kind} model")
        semantic_only = [
            n for n, on in (("tile", tile), ("tta", tta), ("probabilities", probabilities), ("entropy", entropy)) if on
        ]
        if semantic_only and served.kind != "semantic":
            problems.append(f"{', '.join(semantic_only)} apply to semantic models; {model!r} is a {served.kind} model")
        if problems:
            raise HTTPException(422, detail="; ".join(problems))
        data = await read_upload(image)
        options = PredictOptions(tile, overlap, tta, probabilities, entropy, threshold, score_threshold)
        body = await guarded(served.predict_bytes, data, options, settings.max_pixels)
        label_png = body.pop("_label_png", None)
        if format == "png":
            return Response(label_png, media_type="image/png", headers={"X-Time-Ms": str(body["time_ms"])})
        return Response(json.dumps(body), media_type="application/json")

    def require_sam() -> SamService:
        if sam is None:
            raise HTTPException(404, detail="this server has no SAM model; start it with --sam CHECKPOINT")
        return sam

    @app.post("/sam/embed", summary="Embed an image for prompting", dependencies=[Depends(authorize)])
    async def sam_embed(image: UploadFile = File(..., description="the image to prompt on")) -> dict[str, Any]:
        service = require_sam()
        data = await read_upload(image)
        return await guarded(service.embed_bytes, data, settings.max_pixels)

    @app.post("/sam/predict", summary="Masks for prompts on an embedded image", dependencies=[Depends(authorize)])
    async def sam_predict(prompt: SamPrompt) -> dict[str, Any]:
        service = require_sam()

        def run() -> dict[str, Any]:
            return service.predict(
                prompt.image_id,
                [list(p) for p in prompt.points],
                list(prompt.labels),
                list(prompt.box) if prompt.box is not None else None,
                prompt.multimask,
            )

        try:
            return await guarded(run)
        except KeyError as e:
            raise HTTPException(404, detail=str(e.args[0])) from None
        except ValueError as e:
            raise HTTPException(422, detail=str(e)) from None

    app.state.started = time.time()
    return app
