"""``maskworks serve``: segmentation over HTTP (FastAPI + uvicorn) with a web page.

Needs the ``serve`` extra: ``pip install "maskworks[serve]"``. Build an app in Python with::

    from maskworks.serve import ServedModel, SamService, ServeSettings, create_app

    app = create_app([ServedModel.from_checkpoint("runs/camvid/best.safetensors")], settings=ServeSettings(token="..."))

and run it with any ASGI server (``uvicorn.run(app, host="127.0.0.1", port=8000)``), or from the command line with
``maskworks serve --checkpoint runs/camvid/best.safetensors``.
"""

from maskworks.serve.runtime import PredictOptions, SamService, ServedModel

__all__ = ["PredictOptions", "SamService", "ServeSettings", "ServedModel", "create_app"]


def __getattr__(name: str):
    if name in ("create_app", "ServeSettings"):  # these need FastAPI (the serve extra)
        try:
            from maskworks.serve import app
        except ImportError as e:
            raise ImportError(f'maskworks.serve.{name} needs FastAPI: pip install "maskworks[serve]" ({e})') from e
        return getattr(app, name)
    raise AttributeError(f"module 'maskworks.serve' has no attribute {name!r}")
