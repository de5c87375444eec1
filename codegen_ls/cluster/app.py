"""Our engine as a Ray Serve application: ``codegen-ls cluster serve --model DIR [--replicas N]``.

Two deployments::

    HTTP ──▶ Ingress (FastAPI, no CPU)  ──handle, session_id──▶  EngineReplica × N (1 CPU each)
             /v1/completions  /infill                            Engine + its per-document KV cache
             /v1/models  /health          SessionAffinityRouter: a document's requests go to the
             retries on a dead replica    replica holding its cache (codegen_ls.cluster.router)

The ingress reads the ``x-session-id`` header (one per document, sent by the LSP server's remote
backend) and passes it to the replica call as ``session_id``; the router hashes it. When a replica
dies mid-request the call fails with Ray's actor error and the ingress sends it again (the router
no longer offers the dead replica; Serve starts a new one). When the HTTP client goes away, Serve
cancels the call and the replica's engine stops at its next decode step. Replicas answer Serve's
health checks, report their counters (``cached_tokens`` among them) as routing stats, and on
shutdown or downscaling finish their requests first (``graceful_shutdown_timeout_s``).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time
# (a string ``Request`` in a Serve ingress class is taken for a body field).

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from codegen_ls.cluster.protocol import ProtocolError
from codegen_ls.cluster.service import CompletionService
from codegen_ls.errors import Cancelled

log = logging.getLogger(__name__)

APP_NAME = "codegen-ls"
SESSION_HEADER = "x-session-id"
RETRIES = 3  # a request is sent again this many times when its replica dies
STUCK_S = 120.0  # a replica whose current request has run this long fails its health check

api = FastAPI(
    title="codegen-ls", description="CodeGen completions on onnxruntime: OpenAI /v1/completions, llama.cpp /infill"
)


@dataclass
class ClusterOptions:
    """How the application is deployed (``codegen-ls cluster serve`` flags)."""

    model_dir: str
    replicas: int = 2
    threads: int = 1  # onnxruntime threads per replica (= CPUs it reserves)
    cache_mb: int = 512  # each replica's KV caches of documents (least recently used dropped past it)
    min_replicas: int | None = None  # set both to autoscale on ongoing requests
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    imbalance: int = 4  # router: leave a session's replica when it is this many requests busier
    graceful_shutdown_timeout_s: float = 20.0
    health_check_period_s: float = 5.0
    api_key: str = ""  # when set, requests need "Authorization: Bearer <key>"


class EngineReplica:
    """One engine (model + KV caches) behind Serve; requests run one at a time on its thread."""

    def __init__(self, model_dir: str, threads: int, cache_mb: int = 512) -> None:
        from codegen_ls.engine.engine import Engine, EngineOptions

        engine = Engine(model_dir, EngineOptions(threads=threads, cache_bytes=cache_mb * 1024 * 1024))
        context = serve.get_replica_context()
        self.actor_name = context.replica_id.to_full_id_str()
        self.service = CompletionService(engine, engine.manifest.name, context.replica_id.unique_id)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="codegen-ls-engine")
        self._started: float | None = None  # when the running request began

    async def run(self, route: str, body: Any, session_id: str | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of ``route`` (``completions`` | ``infill``) for one session."""
        fn = self.service.completions if route == "completions" else self.service.infill
        stop = threading.Event()

        def work() -> dict[str, Any]:
            self._started = time.monotonic()
            try:
                return fn(body, session_id, stop.is_set)
            finally:
                self._started = None

        try:
            return 200, await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except asyncio.CancelledError:  # the client went away: the engine stops at its next step
            stop.set()
            raise
        except ProtocolError as exc:
            return 400, error_body(str(exc), "invalid_request_error")
        except Cancelled:
            return 499, error_body("cancelled", "cancelled")

    def check_health(self) -> None:
        """Serve's health check: a request stuck for minutes marks the replica unhealthy (replaced)."""
        if self._started is not None and time.monotonic() - self._started > STUCK_S:
            raise RuntimeError(f"a request has run for over {STUCK_S:.0f} s")

    def record_routing_stats(self) -> dict[str, Any]:
        """Counters the router sees (``RunningReplica.routing_stats``)."""
        return {**self.service.stats(), "actor": self.actor_name}

    def stats(self) -> dict[str, Any]:
        return self.record_routing_stats()

    def info(self) -> dict[str, Any]:
        e = self.service.engine
        return {"model": self.service.model, "context_length": e.context_length, "eos_token_id": e.eos_id}


def error_body(message: str, kind: str) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind}}


@serve.ingress(api)
class Ingress:
    """HTTP routes; forwards to the engine replicas with the session id; retries on replica death."""

    def __init__(self, engines: DeploymentHandle, api_key: str = "") -> None:
        self.engines, self._api_key = engines, api_key
        self._info: dict[str, Any] | None = None

    async def _forward(self, route: str, request: Request) -> JSONResponse:
        if self._api_key and request.headers.get("authorization", "") != f"Bearer {self._api_key}":
            return JSONResponse(error_body("a valid API key is required", "authentication_error"), 401)
        try:
            body = await request.json()
        except Exception:
            return JSONResponse(error_body("the body must be JSON", "invalid_request_error"), 400)
        session = request.headers.get(SESSION_HEADER) or None
        last: Exception | None = None
        for attempt in range(RETRIES + 1):
            try:
                status, payload = await self.engines.run.remote(route, body, session_id=session)
                if attempt and isinstance(payload.get("codegen_ls"), dict):
                    payload["codegen_ls"]["retried"] = attempt  # answered by another replica after a failure
                return JSONResponse(payload, status)
            except (RayActorError, ActorUnavailableError) as exc:  # the replica died: another one answers
                last = exc
                log.warning("replica failed (%s), attempt %d of %d", type(exc).__name__, attempt + 1, RETRIES + 1)
                await asyncio.sleep(0.05 * 2**attempt)
        return JSONResponse(error_body(f"no replica could answer: {type(last).__name__}", "unavailable"), 503)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        return await self._forward("completions", request)

    @api.post("/infill")
    async def infill(self, request: Request) -> JSONResponse:
        return await self._forward("infill", request)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self._model_info()
        return {
            "object": "list",
            "data": [
                {
                    "id": info["model"],
                    "object": "model",
                    "owned_by": "codegen-ls",
                    "codegen_ls": {**info, "fim": False, "echo": True, "token_ids": True},
                }
            ],
        }

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", **(await self._model_info())}

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.engines.info.remote()
        return self._info


def build_app(options: ClusterOptions) -> Any:
    """The Serve application: the ingress bound to ``options.replicas`` engine replicas."""
    model_dir = str(Path(options.model_dir).resolve())
    scaling: dict[str, Any]
    if options.min_replicas is not None and options.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": options.replicas}
    router_fields: dict[str, Any] = {
        "request_router_class": "codegen_ls.cluster.router:SessionAffinityRouter",
        "request_router_kwargs": {"imbalance": options.imbalance},
        "request_routing_stats_period_s": 2.0,
    }
    router = RequestRouterConfig(**router_fields)
    engine: Any = serve.deployment(
        EngineReplica,
        name="Engine",
        ray_actor_options={"num_cpus": options.threads},
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
        request_router_config=router,
        **scaling,
    )
    ingress: Any = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)(
        Ingress
    )
    return ingress.bind(engine.bind(model_dir, options.threads, options.cache_mb), options.api_key)


def serve_forever(
    options: ClusterOptions, host: str, port: int, address: str | None = None, num_cpus: int | None = None
) -> int:
    """Start (or join) Ray, run the application until interrupted, then drain and stop."""
    import ray

    if address:
        ray.init(address=address, namespace="serve")
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="serve")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    log.warning(
        "codegen-ls cluster: http://%s:%d/v1/completions (and /infill) with %s",
        host,
        port,
        f"{options.min_replicas}-{options.max_replicas} replicas"
        if options.min_replicas is not None
        else f"{options.replicas} replica(s)",
    )

    def stop(signum: int, frame: Any) -> None:  # SIGTERM (systemd, docker stop, kill): drain as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.warning("codegen-ls cluster: draining the replicas, then stopping")
    finally:
        serve.delete(APP_NAME)  # replicas finish their requests first (graceful_shutdown_timeout_s)
        serve.shutdown()
        ray.shutdown()
    return 0
