"""``maskworks serve``: a REST API and a web page over checkpoints named on the command line (FastAPI + uvicorn).

The server loads only the checkpoints given here (``--checkpoint``, any number, semantic / instance / panoptic; and
``--sam`` for promptable segmentation); requests never name files. It binds to 127.0.0.1 unless ``--host`` says
otherwise, and with ``--token`` (or ``MASKWORKS_SERVE_TOKEN``) the API needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

__all__ = ["add_parser", "build_app", "parse_checkpoint", "run"]

log = logging.getLogger("maskworks")

TOKEN_ENV = "MASKWORKS_SERVE_TOKEN"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_checkpoint(text: str) -> tuple[str | None, str]:
    """``PATH`` or ``NAME=PATH`` -> ``(name or None, path)``."""
    if "=" in text:
        name, path = text.split("=", 1)
        if _NAME.match(name) and path:
            return name, path
        raise argparse.ArgumentTypeError(
            f"--checkpoint expects PATH or NAME=PATH with NAME of letters, digits, '_', '-', '.', got {text!r}"
        )
    return None, text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand (``func=run``) to ``subparsers``."""
    p = subparsers.add_parser(
        "serve",
        help="serve checkpoints over HTTP: REST API + a web page (needs maskworks[serve])",
        description="Serve checkpoints over HTTP with FastAPI + uvicorn: GET /health, GET /models, "
        "POST /predict/{model} (multipart image -> semantic label PNG + class shares, instance COCO results with "
        "RLE, or panoptic id PNG + segments), POST /sam/embed and /sam/predict (with --sam), OpenAPI docs at /docs "
        "and a web page at / (upload or drop an image, see the overlay; in SAM mode click to segment). "
        "Uploads are limited in bytes and pixels, requests in concurrency, queue length and time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        '  pip install "maskworks[serve]"\n'
        "  maskworks serve --checkpoint runs/demo/best.safetensors            # then open http://127.0.0.1:8000\n"
        "  maskworks serve --checkpoint roads=runs/camvid/best.safetensors --checkpoint cells=runs/isbi/best.safetensors\n"
        "  maskworks serve --sam sam_vit_b_01ec64.pth --port 8080\n"
        "  MASKWORKS_SERVE_TOKEN=s3cret maskworks serve --checkpoint runs/demo/best.safetensors --host 0.0.0.0\n"
        "  curl -F image=@street.png http://127.0.0.1:8000/predict/demo?format=png > label.png\n",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        type=parse_checkpoint,
        default=[],
        metavar="[NAME=]PATH",
        help="a maskworks checkpoint (.safetensors with its .json); repeat for several models. The URL name is NAME, "
        "else the run folder's name for best/last.safetensors, else the file stem",
    )
    p.add_argument(
        "--sam",
        metavar="CHECKPOINT",
        help="SAM weights for /sam/embed and /sam/predict: official segment_anything .pth, HF SamModel state dict, or a "
        "maskworks checkpoint of a promptable model",
    )
    p.add_argument("--sam-model", help="SAM architecture when the weights do not tell (sam_vit_base / _large / _huge)")
    p.add_argument("--sam-cache", type=int, default=8, help="image embeddings SAM keeps (LRU; default 8)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on the API (default: ${TOKEN_ENV} if set; the environment keeps "
        "it out of the process list)",
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted, MiB (default 20)")
    p.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="largest image accepted, width x height (default 4096^2)"
    )
    p.add_argument("--max-concurrency", type=int, default=1, help="requests computed at once (default 1)")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting for a worker; more get 503 (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take; over it, 504 (default 60)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
    return p


def build_app(args: argparse.Namespace):
    """The app ``maskworks serve`` runs for parsed ``args`` (models loaded, limits set)."""
    from maskworks.cli.config import ConfigError

    try:
        from maskworks.serve import SamService, ServedModel, ServeSettings, create_app
    except ImportError as e:
        raise ConfigError(f'maskworks serve needs FastAPI and uvicorn: pip install "maskworks[serve]" ({e})') from e
    if not args.checkpoint and not args.sam:
        raise ConfigError("nothing to serve: give --checkpoint PATH (repeatable) and / or --sam CHECKPOINT")
    if args.sam_cache < 1:
        raise ConfigError(f"--sam-cache must be >= 1, got {args.sam_cache}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        settings = ServeSettings(
            token=token,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels,
            max_concurrency=args.max_concurrency,
            max_queue=args.max_queue,
            timeout_s=args.timeout,
        )
    except ValueError as e:
        raise ConfigError(str(e).replace("max_", "--max-").replace("_", "-")) from e
    served = {}
    for name, path in args.checkpoint:
        model = ServedModel.from_checkpoint(path, name=name, device=args.device)
        if model.name in served:
            raise ConfigError(
                f"two checkpoints would be served as {model.name!r} ({path}); name them: --checkpoint NAME=PATH"
            )
        served[model.name] = model
        log.info(
            "loaded %s (%s, %s, %d classes) from %s",
            model.name,
            model.kind,
            model.architecture,
            len(model.class_names),
            path,
        )
    sam = None
    if args.sam:
        from maskworks.cli.sam import load_sam
        from maskworks.engine import resolve_device

        net = load_sam(checkpoint=args.sam, model=args.sam_model).to(resolve_device(args.device))
        sam = SamService(net, cache_size=args.sam_cache)
        log.info("loaded SAM %s from %s", sam.architecture, Path(args.sam))
    return create_app(served, sam=sam, settings=settings)


def run(args: argparse.Namespace) -> int:
    from maskworks.cli.config import ConfigError

    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError(f'maskworks serve needs uvicorn: pip install "maskworks[serve]" ({e})') from e
    app = build_app(args)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and app.state.settings.token is None:
        log.warning(
            "serving on %s without a token: anyone who reaches this address can use the models (set --token or %s)",
            args.host,
            TOKEN_ENV,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"maskworks serve: {len(app.state.models)} model(s) ({', '.join(app.state.models) or 'none'})"
        f"{' + SAM' if app.state.sam is not None else ''} at http://{shown}:{args.port}/ (API docs at /docs); "
        "Ctrl+C stops",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
