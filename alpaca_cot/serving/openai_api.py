"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (streams as SSE)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from alpaca_cot.generation.sampling import SEED_MAX, SEED_MIN, SamplingParams
from alpaca_cot.serving.service import APIError, ModelService, collect, openai_record, text_of

INT_MAX = 2**31 - 1  # the bound of integer fields that have no natural one
PENALTY = "not supported; use repetition_penalty (Hugging Face's, >1 penalises repeats)"
UNSUPPORTED = {"n": "only n=1 is supported (one answer per request)", "presence_penalty": PENALTY,
               "frequency_penalty": PENALTY, "logprobs": "log probabilities are not supported",
               "echo": "echo is not supported"}
router = APIRouter()  # create_app puts it behind the API key


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

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else [] if stop is None else stop

    @field_validator(*UNSUPPORTED, check_fields=False)  # echo is a field of CompletionRequest only
    @classmethod
    def _supported(cls, value: Any, info: ValidationInfo) -> Any:
        unsupported = value != 1 if info.field_name == "n" else bool(value)
        if unsupported:
            raise ValueError(UNSUPPORTED[info.field_name])
        return value


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: the prompt is one instruction, rendered by the run's template."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """The one model this server serves."""
    model_id = request.app.state.service.model_id
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                                        "owned_by": "alpaca-cot"}]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, req: ChatCompletionRequest) -> Response:
    """A chat completion of ``messages``, rendered by the run's template."""
    messages = [{"role": m.role, "content": text_of(m.content)} for m in req.messages]
    return await _complete(request, req, openai_record(messages), "chat.completion")


@router.post("/v1/completions")
async def completions(request: Request, req: CompletionRequest) -> Response:
    """A completion of ``prompt``, taken as one instruction."""
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return await _complete(request, req, {"instruction": prompt, "input": ""}, "text_completion")


@dataclass
class _Reply:
    """One request's answer in OpenAI's shapes; ``kind`` is "chat.completion" or "text_completion"."""

    kind: str
    head: dict
    prompt_tokens: int

    def choice(self, text: str, finish: str | None, chunk: bool, role: bool = False) -> dict:
        out: dict[str, Any] = {"index": 0}
        if self.kind == "text_completion":
            out["text"] = text
        elif chunk:  # deltas: the role once, then text, then an empty delta with the finish reason
            out["delta"] = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
        return {**out, "logprobs": None, "finish_reason": finish}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def _complete(request: Request, req: SamplingRequest, record: dict, kind: str) -> Response:
    """Run one OpenAI request: the whole answer, or its pieces as server-sent events."""
    service: ModelService = request.app.state.service
    if req.model != service.model_id:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{service.model_id}'.",
                       param="model", code="model_not_found")
    prompt_tokens = await service.off_loop(service.prompt_tokens, record)
    max_tokens = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) else None
    params = service.params(max_new_tokens=service.budget(prompt_tokens, max_tokens or req.max_tokens),
                            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                            repetition_penalty=req.repetition_penalty, no_repeat_ngram_size=req.no_repeat_ngram_size)
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    reply = _Reply(kind, {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                          "model": service.model_id}, prompt_tokens)
    pieces = service.stream(record, params, req.stop)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_events(service, reply, pieces, params, usage))
    text = await collect(request, pieces)
    if text is None:
        return Response(status_code=499)  # nobody is listening
    reason, tokens = await _finish(service, text, params)
    return JSONResponse({**reply.head, "object": kind, "choices": [reply.choice(text, reason, False)],
                         "usage": reply.usage(tokens)})


async def _events(service: ModelService, reply: _Reply, pieces: AsyncIterator[str], params: SamplingParams,
                  usage: bool) -> AsyncIterator[dict]:
    chunk = {**reply.head, "object": "chat.completion.chunk" if reply.kind == "chat.completion" else reply.kind}
    if reply.kind == "chat.completion":
        yield {**chunk, "choices": [reply.choice("", None, True, role=True)]}
    text = ""
    async for piece in pieces:
        text += piece
        yield {**chunk, "choices": [reply.choice(piece, None, True)]}
    reason, tokens = await _finish(service, text, params)
    yield {**chunk, "choices": [reply.choice("", reason, True)]}
    if usage:
        yield {**chunk, "choices": [], "usage": reply.usage(tokens)}


async def _finish(service: ModelService, text: str, params: SamplingParams) -> tuple[str, int]:
    """(finish reason, completion tokens) of an answer."""
    tokens = await service.off_loop(service.completion_tokens, text, params)
    return "length" if tokens >= params.max_new_tokens else "stop", tokens


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
