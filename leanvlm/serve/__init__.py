"""Serving: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching scheduler, and
its Ray Serve deployment for scale-out (`leanvlm.serve.ray_app`)."""

from leanvlm.serve.app import ServeOptions, create_app
from leanvlm.serve.protocol import ApiError, Limits

__all__ = ["ApiError", "Limits", "ServeOptions", "create_app", "run"]


def run(engine, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
        backend: str = "onnxruntime", threads: int | None = None, log_level: str = "info") -> None:
    """Load `engine` and serve it with uvicorn until interrupted (what `leanvlm serve` runs)."""
    import uvicorn

    from leanvlm.runtime import Pipeline

    opts = {"threads": threads} if threads and backend == "onnxruntime" else {}
    app = create_app(Pipeline.load(engine, backend=backend, **opts), options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
