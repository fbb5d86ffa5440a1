"""What an operator and a browser ask: GET /health (liveness), /ready (readiness), /metrics (Prometheus) and
the page at /."""

import importlib.resources
import json

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
async def page(state: ServingState = Depends(serving)):
    """The page, its form starting from the server's own decoding defaults."""
    html = importlib.resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    defaults = json.dumps(page_defaults(state)).replace("<", "\\u003c")  # never ends the <script>
    return html.replace("/*SERVER_DEFAULTS*/{}", defaults)


def page_defaults(state: ServingState) -> dict:
    """{form field id: value}: what a request that sets nothing is decoded with."""
    g = state.generation_args
    return {"strategy": g.decode_strategy, "max_tokens": state.predictor.config.tgt_length,
            "min_tgt_length": g.min_tgt_length, "num_beams": g.num_beams,
            "length_penalty": g.length_penalty, "no_repeat_ngram_size": g.no_repeat_ngram_size,
            "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}


@router.api_route("/favicon.ico", methods=["GET", "HEAD"])
async def favicon():
    """No icon, and not an error: browsers ask for it unprompted (the page itself names none)."""
    return Response(status_code=204)
