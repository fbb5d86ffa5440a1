"""The FastAPI app: the shared state, the middleware, the errors in OpenAI's shape and the routes of each
endpoint family (completions.py: OpenAI's /v1/completions and /v1/models; blanks.py: GLM's /fill and
/score; status.py: /health, /ready, /metrics and the page at /). Decoding runs in the engine's thread;
handlers only await its events."""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import RequestError
from ..generation_settings import GenerationArguments
from ..prediction import Predictor
from . import blanks, completions, status
from .middleware import AllowedHosts, BodyLimit, Observed, RequireApiKey
from .protocol import error_response
from .state import Overloaded, ServeOptions, ServingState

__all__ = ["ServeOptions", "create_app"]


def create_app(predictor: Predictor, generation_args: GenerationArguments, options: ServeOptions,
               prefixes=None, prompt=None) -> FastAPI:
    """The server of `predictor`, its decoding defaults `generation_args` (what a request does not set), and
    of `prefixes` ({name: GLMPrefixModel} over the same base, server.py --prefixes), `prompt` (a ServedPrompt
    /score applies)."""
    state = ServingState(predictor, generation_args, options, prefixes, prompt)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        yield
        state.stop()

    # No docs pages: they load their scripts from a CDN.
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    app.state.engine = state.engine  # for operators' and tests' introspection
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(RequireApiKey, api_key=options.api_key)
    if options.allowed_hosts is not None:
        app.add_middleware(AllowedHosts, extra=options.allowed_hosts)
    app.add_middleware(Observed, metrics=state.metrics)
    for handled, handler in ((RequestValidationError, invalid), (StarletteHTTPException, http_error),
                             (RequestError, bad_request), (Overloaded, overloaded)):  # fmt: skip
        app.add_exception_handler(handled, handler)
    for family in (status, completions, blanks):
        app.include_router(family.router)
    return app


async def invalid(request, error: RequestValidationError):
    first = error.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", "body")
    field = ".".join(where) or "body"
    return error_response(400, f"{field}: {first.get('msg', 'invalid')}", where[0] if where else "body")


async def http_error(request, error: StarletteHTTPException):  # 404, 405
    return error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}")


async def bad_request(request, error: RequestError):
    return error_response(error.status, str(error), error.param)


async def overloaded(request, error: Overloaded):
    retry_after = request.app.state.serving.options.retry_after
    return error_response(503, f"server busy: {error}; retry later", kind="overloaded",
                          headers={"Retry-After": str(retry_after)})
