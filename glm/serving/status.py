"""What an operator and a browser ask: GET /health (liveness), /ready (readiness), /metrics (Prometheus) and
the page at /."""

import importlib.resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response

from .metrics import CONTENT_TYPE
from .protocol import error_response
from .state import ServingState, serving

__all__ = ["router"]

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health():
    return {"status": "ok"}


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(state: ServingState = Depends(serving)):
    engine, options = state.engine, state.options
    if not state.accepting:
        return error_response(503, "not ready: the server is shutting down", kind="overloaded")
    if engine.queue_depth >= options.max_queue:
        return error_response(503, "not ready: the queue is full", kind="overloaded",
                              headers={"Retry-After": str(options.retry_after)})
    return {"ready": True, "queue_depth": engine.queue_depth, "live_rows": engine.live_rows}


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def prometheus(state: ServingState = Depends(serving)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
async def page():
    return importlib.resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
