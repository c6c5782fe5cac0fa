"""The web service in one FastAPI app: the original API (here: ``POST /`` ``{"prompt"}`` -> ``{"response",
"status", "time"}`` and ``GET /query/{query}``), the OpenAI-compatible API (``openai_api``), the chat page (``ui``).

One model serves every client (``service``): waiting requests decode together, up to ``max_batch_size``, each
with its own settings and stop strings; more wait in arrival order. A client that disconnects, waiting or
mid-answer, leaves the queue or stops its generation. Bodies above ``max_request_bytes`` get a 413.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from alpaca_cot.config import ServeArgs
from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.serving import openai_api
from alpaca_cot.serving.service import APIError, ModelService, collect
from alpaca_cot.serving.ui import mount_ui

router = APIRouter()  # the original API and the API's own description


def create_app(generator: Generator, defaults: SamplingParams | None = None, *, model_id: str = "alpaca-cot",
               api_key: str | None = None, ui: bool = True, max_batch_size: int = ServeArgs.max_batch_size,
               max_request_bytes: int = ServeArgs.max_request_bytes) -> FastAPI:
    """The web service over ``generator``; with ``api_key``, the API (and ``/docs``, ``/openapi.json``) wants
    ``Authorization: Bearer KEY`` and the chat page a login whose password is the key.

    Up to ``max_batch_size`` requests decode together (1: one at a time, the others queue); this switches
    ``generator`` to batched streaming. A request body above ``max_request_bytes`` gets a 413.
    """
    if max_batch_size < 1 or max_request_bytes < 1:
        raise UserError(f"max_batch_size ({max_batch_size}) and max_request_bytes ({max_request_bytes}) "
                        "must be at least 1")
    service = ModelService(generator, defaults or SamplingParams(), model_id, max_batch_size)
    app = FastAPI(title="Alpaca-CoT", docs_url=None, redoc_url=None, openapi_url=None,  # served below, keyed
                  lifespan=_frozen_startup)
    app.state.service, app.state.api_key = service, api_key
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_exception_handler(UserError, lambda request, exc: APIError(400, str(exc)).response())
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: _validation_error(exc).response())
    app.add_exception_handler(HTTPException, lambda request, exc: APIError(
        exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response())
    app.add_exception_handler(Exception, lambda request, exc: APIError(  # e.g. out of memory: this request fails
        500, f"The server failed to answer: {exc}", type="server_error").response())
    for routes in (router, openai_api.router):
        app.include_router(routes, dependencies=[Depends(_authorize)])
    if ui:
        mount_ui(app, service, api_key)
    return app


@contextlib.asynccontextmanager
async def _frozen_startup(app: FastAPI) -> AsyncIterator[None]:
    """While serving, the garbage collector leaves alone what exists at startup: the model and the libraries,
    some 500,000 objects, that every full collection would walk again (pauses of 0.6-0.9 s for every stream,
    measured under load at 50 streams), though they live as long as the server."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _authorize(request: Request) -> None:
    api_key = request.app.state.api_key
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "No API key was given: send the header 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")


class PromptRequest(BaseModel):
    """The original API's body."""

    prompt: str


@router.post("/")
async def original(request: Request, req: PromptRequest) -> Response:
    """The original API: ``{"prompt"}`` -> ``{"response", "status", "time"}``."""
    return await _respond(request, req.prompt, lambda text: {
        "response": text, "status": 200, "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")})


@router.get("/query/{query}")
async def query(request: Request, query: str) -> Response:
    """The original API's GET form: ``{"query", "answer", "time"}`` (seconds)."""
    start = time.perf_counter()
    return await _respond(request, query, lambda text: {"query": query, "answer": text,
                                                        "time": time.perf_counter() - start})


async def _respond(request: Request, prompt: str, body: Callable[[str], dict]) -> Response:
    """The answer to ``prompt`` as the JSON ``body`` makes of it (a 499 when the client has gone)."""
    service: ModelService = request.app.state.service
    record = {"instruction": prompt, "input": ""}
    prompt_tokens = await service.off_loop(service.prompt_tokens, record)
    params = service.params(max_new_tokens=service.budget(prompt_tokens, None))
    text = await collect(request, service.stream(record, params))
    return Response(status_code=499) if text is None else JSONResponse(body(text))


class BodyLimit:
    """ASGI middleware: a request body above ``max_bytes`` gets a 413 in OpenAI's shape before the app
    reads it; the declared length decides at once, a chunked body is counted as it arrives."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if length.isdigit():
            if int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        # No declared length (chunked): read the body here, up to the cap, and hand it on.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        error = APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
                         code="request_too_large")
        await error.response()(scope, receive, send)


def _param_name(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``messages[0].content`` (union member names dropped)."""
    name = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part not in ("str", "int", "float", "bool") and "[" not in part and not part.startswith("function-"):
            name += f".{part}" if name else part
    return name or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # A list given where a union also takes a string fails both members; the list member's error says more.
    first = next((e for e in errors if e.get("loc", ())[-1:] != ("str",)), errors[0])
    param = _param_name(tuple(first.get("loc", ())))
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "json_invalid":
        return APIError(400, "The body of the request is not valid JSON.")
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {message}" if param else message, param=param)
