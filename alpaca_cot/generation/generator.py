"""One generator for every script: prompts from the run's template, batched or streamed output."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch
import transformers

from alpaca_cot.data.templates import Template
from alpaca_cot.generation.batching import BatchedDecoder, Job
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.generation.text import AnswerText


class _ShortWindow:
    """A text streamer that decodes few tokens per token: the stock one decodes the whole line again (quadratic);
    once all its text is sent, the last tokens stay as context (as the stock one does at a newline). Only text
    is handed to the reader."""

    CONTEXT = 8

    def put(self, value: torch.Tensor) -> None:
        super().put(value)  # type: ignore[misc]
        if len(self.token_cache) > 4 * self.CONTEXT:
            if len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs)) == self.print_len:
                self.token_cache = self.token_cache[-self.CONTEXT:]
                self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text or stream_end:  # a token that completes no text (about 1 in 7) would wake the reader for nothing
            super().on_finalized_text(text, stream_end)  # type: ignore[misc]


class _Streamer(_ShortWindow, transformers.TextIteratorStreamer):
    pass


class _AsyncStreamer(_ShortWindow, transformers.AsyncTextIteratorStreamer):
    pass


class Generator:
    """Wraps (model, tokenizer, template): records or message lists in, answers out."""

    def __init__(self, model: Any, tokenizer: Any, template: Template):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one model: requests are served one at a time, in order
        # Encoding with padding mutates the fast tokenizer's state: concurrent calls from server
        # threads fail with "Already borrowed", so encoding is serialised too.
        self.tokenizer_lock = threading.Lock()
        stop = {tokenizer.eos_token_id}
        if template.kind == "chat":
            marker = template.end_marker(tokenizer)
            ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
            if len(ids) == 1:
                stop.add(ids[0])
        self.stop_ids = sorted(i for i in stop if i is not None)
        self.decoder = BatchedDecoder(self, 1)  # streams one at a time until batch_streams

    def prompt(self, record: dict) -> str:
        """The inference prompt of a unified record (single-turn or ``messages``)."""
        return self.template.render_prompt(record, self.tokenizer)

    def context_window(self) -> int:
        """How many tokens the model attends to."""
        config = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def prompt_ids(self, record: dict, tokenizer: Any = None) -> list[int]:
        """Token ids of the inference prompt of ``record``; ``tokenizer``: a copy that the calling thread owns."""
        prompt, add_special = self.prompt(record), self.template.add_special_tokens
        with self.tokenizer_lock if tokenizer is None else contextlib.nullcontext():
            return (tokenizer or self.tokenizer)(prompt, add_special_tokens=add_special)["input_ids"]

    def generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (seeding torch when ``params`` has a seed)."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return {**params.generation_kwargs(), "eos_token_id": self.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id, "use_cache": True}

    def generate(self, records: list[dict], params: SamplingParams | None = None,
                 batch_size: int = 8) -> list[str]:
        """Answers for ``records``, in order: batches of similar length, left-padded, KV cache on."""
        answers = dict(pair for batch in self.generate_batches(records, params, batch_size) for pair in batch)
        return [answers[i] for i in range(len(records))]

    @torch.inference_mode()
    def generate_batches(self, records: list[dict], params: SamplingParams | None = None,
                         batch_size: int = 8) -> Iterator[list[tuple[int, str]]]:
        """Yield each batch's ``(index into records, answer)`` pairs as soon as it is done.

        Batches hold prompts of similar length, longest first (little padding; a batch that does
        not fit in memory fails at once rather than at the end).
        """
        params = params or SamplingParams()
        prompts = [self.prompt(r) for r in records]
        with self.tokenizer_lock:
            lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            with self.tokenizer_lock:
                batch = self.tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                       add_special_tokens=self.template.add_special_tokens)
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with self.lock:
                out = self.model.generate(**batch, **self.generate_kwargs(params))
            new = out[:, batch["input_ids"].shape[1]:]
            yield [(i, self.template.cut_response(self.tokenizer.decode(new[row], skip_special_tokens=True)))
                   for row, i in enumerate(chunk)]

    def batch_streams(self, max_batch_size: int) -> bool:
        """From now on, concurrent streams decode together, up to ``max_batch_size`` at a time (more wait in
        arrival order), each with its own settings and seed; a greedy answer is the one ``generate`` gives alone.
        False when streams stay one at a time: ``max_batch_size`` 1, or a model ``BatchedDecoder`` cannot batch."""
        self.decoder = BatchedDecoder(self, max_batch_size)
        return self.decoder.batching

    def stream(self, record: dict, params: SamplingParams | None = None, stop_event: threading.Event | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield answer text pieces as they are generated; setting ``stop_event`` ends generation. The answer is
        cut at the template's stop strings, then at ``stop`` (see ``AnswerText``, which holds back what could
        begin one). Beam search cannot stream in transformers: its answer comes as one piece."""
        job = self._submit(self.prompt_ids(record), params, stop_event, _Streamer)
        answer = AnswerText(self.template.stop_strings, stop)
        try:
            for piece in job.streamer:
                if text := answer.feed(piece):
                    yield text
                if answer.done:
                    break
            if text := answer.rest():
                yield text
        finally:
            job.stop_event.set()  # a consumer that stops early (client gone) frees the model at the next token
        if job.errors:
            raise job.errors[0]

    async def stream_async(self, prompt_ids: list[int], params: SamplingParams | None = None,
                           stop_event: threading.Event | None = None, stop: Sequence[str] = ()) -> AsyncIterator[str]:
        """``stream`` for an asyncio caller, from the prompt's token ids: the decoder hands its text straight
        to the event loop (no thread per request)."""
        job = self._submit(prompt_ids, params, stop_event, _AsyncStreamer)
        answer = AnswerText(self.template.stop_strings, stop)
        try:
            async for piece in job.streamer:
                if text := answer.feed(piece):
                    yield text
                if answer.done:
                    break
            if text := answer.rest():
                yield text
        finally:
            job.stop_event.set()  # the decoder drops the row at its next step
        if job.errors:
            raise job.errors[0]

    def _submit(self, prompt_ids: list[int], params: SamplingParams | None, stop_event: threading.Event | None,
                streamer: type[transformers.TextIteratorStreamer]) -> Job:
        job = Job(list(prompt_ids), params or SamplingParams(),
                  streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True), stop_event or threading.Event())
        self.decoder.submit(job)
        return job
