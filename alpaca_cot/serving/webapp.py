"""The web service in one FastAPI app: the original API, an OpenAI-compatible API, a Gradio chat page.

Routes: ``POST /`` ``{"prompt"}`` -> ``{"response", "status", "time"}`` and ``GET /query/{query}`` (the
original's); ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (OpenAI's shapes,
streaming as server-sent events); the chat page at ``/ui/`` (``GET /`` redirects there).

One model serves every client: the requests that are waiting decode together in one batch (continuous
batching: a request joins at the next token), each streamed to its own client with its own sampling settings
and stop strings; beyond ``max_batch_size`` they wait in arrival order. With ``max_batch_size=1``, or a model
that cannot be batched, requests are answered one at a time in a first-come-first-served queue. A client
that disconnects, waiting or mid-answer, leaves the queue or stops its generation. Prompts are tokenized off
the event loop; bodies above ``max_request_bytes`` get a 413.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from alpaca_cot.config import ServeArgs
from alpaca_cot.data.templates import record_from_messages
from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import SEED_MAX, SEED_MIN, Generator, SamplingParams

UI_PATH = "/ui"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
MAX_BATCH_SIZE = ServeArgs.max_batch_size  # streams decoded together; more wait their turn (web.py's flags)
MAX_REQUEST_BYTES = ServeArgs.max_request_bytes
INT_MAX = 2**31 - 1  # the bound of integer fields that have no natural one


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


# ---- requests -----------------------------------------------------------------------------------
class TextPart(BaseModel):
    """One part of a message's content; only text is understood."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat turn; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by both completion endpoints; unknown fields are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and Infinity are no settings

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] = []  # or one string
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logprobs: bool | int | None = None
    user: str | None = None
    # Hugging Face sampling knobs (vLLM's names; the openai client sends them through extra_body)
    top_k: int | None = Field(None, ge=0, le=INT_MAX)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=INT_MAX)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one answer per request)")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else [] if stop is None else stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError("not supported; use repetition_penalty (Hugging Face's, >1 penalises repeats)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> None:
        if value:
            raise ValueError("log probabilities are not supported")
        return None


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: the prompt is one instruction, rendered by the run's template."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo


class PromptRequest(BaseModel):
    """The original API's body."""

    prompt: str


# ---- the model queue ----------------------------------------------------------------------------
def text_of(content: str | list[Any]) -> str:
    """Message content (a string, or OpenAI/Gradio text parts) as one string."""
    if isinstance(content, str):
        return content
    parts = (part if isinstance(part, dict) else part.model_dump() for part in content)
    return "".join(part.get("text", "") for part in parts if part.get("type") == "text")


def openai_record(messages: list[dict]) -> dict:
    """OpenAI messages as a unified record (OpenAI's "developer" role is our system turn)."""
    return record_from_messages([{"role": "system" if m["role"] == "developer" else m["role"],
                                  "content": m["content"]} for m in messages])


class ModelService:
    """One ``Generator`` shared by every client: batched (see ``Generator.batch_streams``), or behind a
    first-come-first-served queue when ``max_batch_size`` is 1 or the model cannot be batched."""

    def __init__(self, generator: Generator, defaults: SamplingParams, model_id: str, max_batch_size: int = 1):
        self.generator = generator
        self.defaults = defaults
        self.model_id = model_id
        self.window = generator.context_window()
        self.batched = generator.batch_streams(max_batch_size)
        # Counting uses its own tokenizer, in its own thread: a fast tokenizer used by two threads at once
        # can fail with "Already borrowed", and a long prompt tokenized on the event loop would stall
        # every other request.
        self.tokenizer = copy.deepcopy(generator.tokenizer)
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._turn = asyncio.Lock()  # the one-at-a-time queue; asyncio locks wake waiters in arrival order

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the tokenizing thread, so the event loop keeps serving."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def params(self, **overrides: Any) -> SamplingParams:
        """The server's defaults with the request's non-None values."""
        return dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    def prompt_ids(self, record: dict) -> list[int]:
        """Token ids of ``record``'s prompt."""
        add_special = self.generator.template.add_special_tokens
        return self.tokenizer(self.generator.prompt(record), add_special_tokens=add_special)["input_ids"]

    def prompt_tokens(self, record: dict) -> int:
        """Token count of ``record``'s prompt."""
        return len(self.prompt_ids(record))

    def completion_tokens(self, text: str, params: SamplingParams) -> int:
        """Token count of an answer, re-tokenized (which can exceed the generated count by a token or two)."""
        return min(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), params.max_new_tokens)

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """New tokens to allow: ``max_tokens`` if it fits the context window, else a 400."""
        room = self.window - prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" and {max_tokens} new tokens" if max_tokens is not None else ""
            raise APIError(400, f"This model's maximum context length is {self.window} tokens; the prompt has "
                                f"{prompt_tokens} tokens{asked}. Shorten the messages or lower max_tokens.",
                           param="messages", code="context_length_exceeded")
        return max_tokens if max_tokens is not None else min(self.defaults.max_new_tokens, room)

    def fit_messages(self, messages: list[dict], max_new_tokens: int) -> list[dict]:
        """Drop the oldest turns (a system turn stays) until the prompt leaves room for the answer."""
        head = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(head):]
        while len(turns) > 1 and self.prompt_tokens(openai_record(head + turns)) + max_new_tokens > self.window:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
        return head + turns

    async def stream(self, record: dict, params: SamplingParams, stop: Sequence[str] = ()) -> AsyncIterator[str]:
        """Answer text pieces, after waiting for this request's turn; cut at the first ``stop`` string.

        Closing the iterator (a client gone) stops generation at the next token: batched, the request
        leaves the batch (or the decoder's queue); one at a time, the model is handed to the next
        request only once this one's generation thread has finished.
        """
        halt = threading.Event()
        if self.batched and params.num_beams == 1:
            ids = await self.off_loop(self.prompt_ids, record)
            source = self.generator.stream_async(ids, params, halt)  # no thread: the decoder feeds the loop
        else:
            source = self._threaded(record, params, halt)
        text, sent = "", 0
        try:
            async for item in source:
                text += item
                cut = min((at for at in (text.find(s) for s in stop) if at >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    return
                safe = len(text) - _pending(text, stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            if len(text) > sent:
                yield text[sent:]
        finally:
            halt.set()
            await source.aclose()

    async def _threaded(self, record: dict, params: SamplingParams, halt: threading.Event) -> AsyncIterator[str]:
        """``Generator.stream`` in a thread of its own, its pieces relayed to the event loop; one request at
        a time unless batched (beam search, when batched, runs beside the batch)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Any] = asyncio.Queue()
        end = object()
        queued = not self.batched  # batched, the decoder keeps the queue
        if queued:
            await self._turn.acquire()  # cancelled while waiting = left the queue, nothing to undo

        def call(fn: Any, *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is shutting down
                loop.call_soon_threadsafe(fn, *args)

        def work() -> None:
            try:
                for piece in self.generator.stream(record, params, halt):
                    call(pieces.put_nowait, piece)
                call(pieces.put_nowait, end)
            except Exception as e:  # raised again in the request's task below
                call(pieces.put_nowait, e)
            finally:
                if queued:
                    call(self._turn.release)

        try:
            threading.Thread(target=work, daemon=True).start()
        except BaseException:
            if queued:
                self._turn.release()
            raise
        try:
            while (item := await pieces.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            halt.set()


def _pending(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins a stop string: held back until decided."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``await work``, cancelling it when the client goes away (then None)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return None


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:  # the 200 header is gone: the error travels as an event
            error = {"message": str(e), "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- the app ------------------------------------------------------------------------------------
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


def create_app(generator: Generator, defaults: SamplingParams | None = None, *, model_id: str = "alpaca-cot",
               api_key: str | None = None, ui: bool = True, max_batch_size: int = MAX_BATCH_SIZE,
               max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The web service over ``generator``; with ``api_key``, the API (and ``/docs``, ``/openapi.json``) wants
    ``Authorization: Bearer KEY`` and the chat page a login whose password is the key.

    Up to ``max_batch_size`` requests decode together (1: one at a time, the others queue); this switches
    ``generator`` to batched streaming. A request body above ``max_request_bytes`` gets a 413.
    """
    if max_batch_size < 1 or max_request_bytes < 1:
        raise UserError(f"max_batch_size ({max_batch_size}) and max_request_bytes ({max_request_bytes}) "
                        "must be at least 1")
    service = ModelService(generator, defaults or SamplingParams(), model_id, max_batch_size)
    app = FastAPI(title="Alpaca-CoT", docs_url=None, redoc_url=None, openapi_url=None)  # served below, keyed
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(UserError)
    async def _bad_setting(request: Request, exc: UserError) -> JSONResponse:
        return APIError(400, str(exc)).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "No API key was given: send the header 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(model: str) -> None:
        if model != service.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{service.model_id}'.",
                           param="model", code="model_not_found")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def finish(text: str, params: SamplingParams) -> tuple[str, int]:
        """(finish reason, completion tokens) of an answer."""
        tokens = await service.off_loop(service.completion_tokens, text, params)
        return "length" if tokens >= params.max_new_tokens else "stop", tokens

    async def answer(request: Request, req: SamplingRequest, record: dict, kind: str) -> Response:
        """Run one OpenAI request; ``kind`` is "chat.completion" or "text_completion"."""
        check_model(req.model)
        prompt_tokens = await service.off_loop(service.prompt_tokens, record)
        max_tokens = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) else None
        params = service.params(max_new_tokens=service.budget(prompt_tokens, max_tokens or req.max_tokens),
                                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                repetition_penalty=req.repetition_penalty,
                                no_repeat_ngram_size=req.no_repeat_ngram_size)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_id}

        def choice(text: str, finish: str | None, chunk: bool, role: bool = False) -> dict:
            out: dict[str, Any] = {"index": 0}
            if kind == "text_completion":
                out["text"] = text
            elif chunk:  # deltas: the role once, then text, then an empty delta with the finish reason
                out["delta"] = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            else:
                out["message"] = {"role": "assistant", "content": text}
            return {**out, "logprobs": None, "finish_reason": finish}

        pieces = service.stream(record, params, req.stop)
        if not req.stream:
            text = await _unless_disconnected(request, _join(pieces))
            if text is None:
                return Response(status_code=499)  # nobody is listening
            reason, tokens = await finish(text, params)
            return JSONResponse({**head, "object": kind, "choices": [choice(text, reason, False)],
                                 "usage": usage(prompt_tokens, tokens)})

        async def events() -> AsyncIterator[dict]:
            chunk = {**head, "object": "chat.completion.chunk" if kind == "chat.completion" else kind}
            if kind == "chat.completion":
                yield {**chunk, "choices": [choice("", None, True, role=True)]}
            text = ""
            async for piece in pieces:
                text += piece
                yield {**chunk, "choices": [choice(piece, None, True)]}
            reason, tokens = await finish(text, params)
            yield {**chunk, "choices": [choice("", reason, True)]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**chunk, "choices": [], "usage": usage(prompt_tokens, tokens)}

        return _sse(events())

    api = [Depends(authorize)]

    @app.get("/openapi.json", dependencies=api, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=api, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API")

    @app.get("/v1/models", dependencies=api)
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list",
                "data": [{"id": service.model_id, "object": "model", "created": created, "owned_by": "alpaca-cot"}]}

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request, req: ChatCompletionRequest) -> Response:
        messages = [{"role": m.role, "content": text_of(m.content)} for m in req.messages]
        return await answer(request, req, openai_record(messages), "chat.completion")

    @app.post("/v1/completions", dependencies=api)
    async def completions(request: Request, req: CompletionRequest) -> Response:
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        return await answer(request, req, {"instruction": prompt, "input": ""}, "text_completion")

    async def respond(request: Request, prompt: str) -> str | None:
        record = {"instruction": prompt, "input": ""}
        params = service.params(max_new_tokens=service.budget(await service.off_loop(service.prompt_tokens, record),
                                                              None))
        return await _unless_disconnected(request, _join(service.stream(record, params)))

    @app.post("/", dependencies=api)
    async def original(request: Request, req: PromptRequest) -> Response:
        response = await respond(request, req.prompt)
        if response is None:
            return Response(status_code=499)
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return JSONResponse({"response": response, "status": 200, "time": now})

    @app.get("/query/{query}", dependencies=api)
    async def query(request: Request, query: str) -> Response:
        start = time.perf_counter()
        response = await respond(request, query)
        if response is None:
            return Response(status_code=499)
        return JSONResponse({"query": query, "answer": response, "time": time.perf_counter() - start})

    if ui:
        _mount_ui(app, service, api_key)
    return app


def _mount_ui(app: FastAPI, service: ModelService, api_key: str | None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local server
    import gradio as gr

    d = service.defaults

    async def chat(message: str, history: list[dict], max_new_tokens: float, temperature: float, top_p: float,
                   repetition_penalty: float) -> AsyncIterator[str]:
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        params = service.params(max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        messages = await service.off_loop(service.fit_messages, messages, params.max_new_tokens)
        if await service.off_loop(service.prompt_tokens, record_from_messages(messages)) + params.max_new_tokens \
                > service.window:
            raise gr.Error(f"The message and the answer do not fit the model's {service.window}-token context; "
                           "shorten the message or lower max new tokens.")
        answer = ""
        async for piece in service.stream(record_from_messages(messages), params):
            answer += piece
            yield answer

    sliders = [
        gr.Slider(1, service.window, value=min(d.max_new_tokens, service.window), step=1, label="max new tokens"),
        gr.Slider(0, 2, value=d.temperature, step=0.05, label="temperature (0 = greedy)"),
        gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="top p"),
        gr.Slider(1, 3, value=d.repetition_penalty, step=0.05, label="repetition penalty"),
    ]
    page = gr.ChatInterface(chat, additional_inputs=sliders, additional_inputs_accordion="Sampling",
                            title=f"Alpaca-CoT · {service.model_id}", analytics_enabled=False,
                            chatbot=gr.Chatbot(label=service.model_id, height=480, buttons=["copy", "copy_all"]))

    def login(username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), (api_key or "").encode())

    gr.mount_gradio_app(app, page, path=UI_PATH, auth=login if api_key else None,
                        auth_message="Log in with any user name and the server's API key as the password.",
                        ssr_mode=False, footer_links=[])

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")
