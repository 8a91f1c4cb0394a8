"""Scale-out on Ray Serve: replicas of the same app behind Ray Serve's HTTP proxy.

`deploy(...)` starts a local Ray instance when none is running (or joins the cluster `RAY_ADDRESS` names),
and runs `replicas` copies of the app; each replica loads the engine and runs its own scheduler, and Ray
Serve's proxy spreads requests over them. The same API as `leanvlm serve` without --ray.
"""

from __future__ import annotations

import os
from pathlib import Path

from leanvlm.errors import UserError
from leanvlm.serve.app import ServeOptions

APP_NAME = "leanvlm"


class LeanVLMReplica:
    """One replica: an engine, its scheduler and the FastAPI app (built inside the replica process)."""

    def __init__(self, engine: str, backend: str, options: ServeOptions, threads: int | None = None):
        from leanvlm.runtime import Pipeline

        opts = {"threads": threads} if threads and backend == "onnxruntime" else {}
        self.pipeline = Pipeline.load(engine, backend=backend, **opts)
        self.options = options

    def __serve_build_asgi_app__(self):
        from leanvlm.serve.app import create_app

        return create_app(self.pipeline, self.options)

    def replica_pid(self) -> int:
        return os.getpid()


def build(engine: str | Path, replicas: int = 1, backend: str = "onnxruntime", options: ServeOptions | None = None,
          threads: int | None = None, num_cpus: float = 1.0):
    """The bound Ray Serve application (for `serve.run`)."""
    from ray import serve

    if replicas < 1:
        raise UserError(f"--replicas {replicas}: must be >= 1")
    options = options or ServeOptions()
    if options.model_name is None:
        options = ServeOptions(options.max_batch, options.max_queue, options.api_key, Path(engine).name,
                               options.limits)
    cls = serve.deployment(name="LeanVLM", num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
                           max_ongoing_requests=(options.max_batch or 8) + options.max_queue,
                           health_check_period_s=2, health_check_timeout_s=10)(serve.ingress()(LeanVLMReplica))
    return cls.bind(str(Path(engine).resolve()), backend, options, threads)


def deploy(engine: str | Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
           backend: str = "onnxruntime", options: ServeOptions | None = None, threads: int | None = None,
           num_cpus: float = 1.0, blocking: bool = False):
    """Start Ray (or join RAY_ADDRESS) and Ray Serve's proxy on host:port, and run the replicas."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # joins the cluster at RAY_ADDRESS, else starts a local instance
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}} if not address else None)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build(engine, replicas, backend, options, threads, num_cpus), name=APP_NAME, route_prefix="/",
                       blocking=blocking)
    return handle
