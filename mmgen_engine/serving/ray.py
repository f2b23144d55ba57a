"""Scale-out on Ray Serve: ``mmgen serve --ray --replicas N [--ray-address ADDR]``.

Each Ray Serve replica is a whole plain server: it loads the models and starts its engines
(``start_engines(config)``: continuous batching inside a replica, as without Ray), builds the
FastAPI app of :mod:`.http` over them with ``create_app``, and Ray runs the app's ASGI lifespan,
which shuts the engines down when the replica stops. Ray's HTTP proxy (one per node) takes the requests on ``host:port``
and routes each to a replica with room; streamed answers (Server-Sent Events) pass through it chunk
by chunk. The config holds checkpoint paths only, so it pickles to the replicas: on a multi-node
cluster every node needs mmgen_engine and the checkpoints at the same paths.

Ray is imported lazily: ``ray[serve]`` is an optional dependency (the ``[ray]`` extra).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading

from ..errors import EngineFailed, MMGenError, one_line
from ..runtime.limits import check_int
from .http import ServerConfig, create_app, start_engines

APP_NAME = "mmgen"
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20  # replicas pass no big objects through Ray: keep the memory for models


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MMGenError(f"--ray needs Ray Serve ({one_line(e)}): pip install 'mmgen_engine[ray]'") from None
    return ray, serve


def deployment(config: ServerConfig, replicas: int = 1, autoscaling: dict | None = None,
               num_gpus: float | None = None, num_cpus: float | None = None):
    """The bound Ray Serve application serving ``config``: ``replicas`` replicas, or as many as Ray's
    autoscaler decides with ``autoscaling`` (a Ray ``autoscaling_config`` dict: ``min_replicas``,
    ``max_replicas``, ...), each with ``num_gpus`` GPUs (default: 1 when ``config.device`` is CUDA,
    else 0), ``num_cpus`` CPUs (default: Ray's, 1; Ray sets a replica's torch threads to it) and
    engines of its own."""
    _, serve = _ray()
    check_int("replicas", replicas, 1, 2**16)
    if num_gpus is None:
        num_gpus = 1 if config.device.startswith("cuda") else 0

    @serve.ingress()  # no app given: each replica builds its own with __serve_build_asgi_app__
    class MMGenServer:
        def __init__(self, config: ServerConfig):
            self._mmgen_config = config

        async def __serve_build_asgi_app__(self):
            # The engines start here rather than in the app's lifespan (which Ray runs too, and which
            # shuts them down) so that a model that fails to load fails the replica with its own error.
            engines = await asyncio.to_thread(start_engines, self._mmgen_config)
            return create_app(self._mmgen_config, engines)

        def check_health(self):
            """Ray replaces a replica whose engine failed (a scheduler thread died)."""
            for name, engine in getattr(self.app.state, "engines", {}).items():
                if isinstance(engine.closed, EngineFailed):
                    raise RuntimeError(f"model {name!r}: {one_line(engine.closed)}")

    options = dict(
        ray_actor_options={"num_gpus": num_gpus, **({} if num_cpus is None else {"num_cpus": num_cpus})},
        # An engine runs up to `slots` requests and holds `max_queued` more; beyond that it answers 429.
        # Ray's router sends a replica at most max_ongoing_requests requests and balances the replicas
        # by their counts, so with this bound a replica never gets more than its engine can hold, and
        # overflow waits in Ray's proxy for the first replica with room rather than being refused by a
        # full one while another idles. (A caption request counts once here but once per image in the
        # engine, so replicas answer 429 to many-image requests as the plain server does.) Each proxy
        # holds up to max_queued requests more, then answers 429 with Retry-After: 1 like an engine.
        max_ongoing_requests=config.slots + config.max_queued,
        max_queued_requests=max(1, config.max_queued),
        backpressure_config={"status_code": 429, "retry_after_s": 1},
        # on shutdown: grace_s for the requests in flight, then 10 s for the engines (the app's lifespan)
        graceful_shutdown_timeout_s=config.grace_s + 10,
        max_constructor_retry_count=3,  # a checkpoint that does not load fails the deployment soon
    )
    if autoscaling is not None:
        # Ray scales on requests per replica; a replica is as busy as it should be when its slots are
        # full (Ray's default target, 2, would add replicas long before that).
        options.update(num_replicas="auto",
                       autoscaling_config={"target_ongoing_requests": config.slots, **autoscaling})
    else:
        options.update(num_replicas=replicas)
    return serve.deployment(MMGenServer, **options).bind(config)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_ray(config: ServerConfig, replicas: int = 1, address: str | None = None, host: str = "127.0.0.1",
              port: int = 8000, autoscaling: dict | None = None, num_gpus: float | None = None,
              num_cpus: float | None = None) -> None:
    """Serve ``config`` on Ray Serve at ``http://host:port`` until SIGTERM or SIGINT (``port`` 0: a free
    one; the other arguments as :func:`deployment`'s). ``address``: the Ray cluster to join
    (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``; default ``$RAY_ADDRESS``); none starts a
    local Ray instance that lives as long as this call.
    Prints the plain server's ready line once every replica is up. On SIGTERM/SIGINT the application
    is removed, its requests in flight given ``config.grace_s`` to finish."""
    app = deployment(config, replicas, autoscaling, num_gpus, num_cpus)  # bad arguments fail before Ray starts
    ray, serve = _ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    if local:  # a new instance even where `ray start` runs one
        ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False)
    else:
        ray.init(address=address)
    stop = threading.Event()
    try:
        port = port or _free_port(host)
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # the deployment failed; its status message ends with the replica's error
            status = serve.status().applications.get(APP_NAME)
            lines = [line for d in (status.deployments.values() if status else ()) for line in d.message.splitlines()]
            raise MMGenError(f"Ray Serve could not start the replicas: {one_line(lines[-1] if lines else e)}") \
                from None
        scale = (f"{autoscaling.get('min_replicas', 1)}-{autoscaling.get('max_replicas', '?')} replicas "
                 f"(autoscaling)" if autoscaling is not None else f"{replicas} replicas")
        shown = f"[{host}]" if ":" in host else host
        print(f"mmgen serve: listening on http://{shown}:{port} (models: {', '.join(config.models)}) "
              f"on Ray Serve, {scale}", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            # Deleting the application first drains it: its replicas take no more requests and finish
            # those in flight (up to grace_s) while the proxies still pass their answers on.
            serve.delete(APP_NAME)
            if local:  # a cluster's Serve stays up for its other applications
                serve.shutdown()
        finally:
            ray.shutdown()
