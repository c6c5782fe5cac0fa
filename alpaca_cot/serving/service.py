"""The model behind the web app: one ``Generator`` shared by every client, prompts counted off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from alpaca_cot.data.templates import record_from_messages
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.generation.text import fit_history

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


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
    """One ``Generator`` shared by every client, its streams batched up to ``max_batch_size`` (see
    ``Generator.batch_streams``) or answered one at a time, in arrival order."""

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

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the tokenizing thread, so the event loop keeps serving."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def params(self, **overrides: Any) -> SamplingParams:
        """The server's defaults with the request's non-None values."""
        return dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    def prompt_tokens(self, record: dict) -> int:
        """Token count of ``record``'s prompt."""
        return len(self.generator.prompt_ids(record, self.tokenizer))

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

    def fit_messages(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
        """The latest ``messages`` whose prompt leaves room for the answer (see ``fit_history``), and its length."""
        return fit_history(messages, lambda kept: self.prompt_tokens(openai_record(kept)), self.window - max_new_tokens)

    async def stream(self, record: dict, params: SamplingParams, stop: Sequence[str] = ()) -> AsyncIterator[str]:
        """Answer text pieces once this request's turn comes, cut at the first ``stop`` string. Closing the
        iterator (a client gone) takes the request out of the queue, or stops its generation at the next token."""
        ids = await self.off_loop(self.generator.prompt_ids, record, self.tokenizer)
        async with contextlib.aclosing(self.generator.stream_async(ids, params, threading.Event(), stop)) as pieces:
            async for piece in pieces:
                yield piece


async def collect(request: Request, pieces: AsyncIterator[str]) -> str | None:
    """The whole text of ``pieces``; None, and the generation stopped, when the client goes away first."""
    task = asyncio.ensure_future(_join(pieces))
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return None


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])
