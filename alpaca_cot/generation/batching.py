"""The model's one decoding thread: streams queue in arrival order and decode together (continuous batching)."""

from __future__ import annotations

import collections
import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import transformers

from alpaca_cot.generation.sampling import SamplingParams

if TYPE_CHECKING:
    from alpaca_cot.generation.generator import Generator


@dataclass
class Job:
    """One stream: its prompt, settings, and where its tokens and errors go."""

    prompt_ids: list[int]
    params: SamplingParams
    streamer: transformers.TextIteratorStreamer
    stop_event: threading.Event
    errors: list[BaseException] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # prompt and answer so far (the penalties read them)
    new_tokens: int = 0
    processors: transformers.LogitsProcessorList | None = None
    rng: torch.Generator | None = None


class BatchedDecoder:
    """One thread decodes every stream of a ``Generator``, in arrival order: batched (one token for every row
    per forward pass, over the stock forward and ``DynamicCache``), or by stock ``generate`` one at a time
    (beam search, ``max_batch_size`` 1, or a model that cannot be batched). A new row's prompt is encoded
    alone, then its cache is left-padded into the batch's (the mask hides the padding; each row has its own
    position ids); a finished or cancelled row leaves at once, with the columns that only it needed."""

    def __init__(self, generator: Generator, max_batch_size: int):
        self.generator = generator
        self.model = generator.model
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # As generate does: only models whose forward takes position ids get them (Bloom's ALiBi reads the mask).
        self.positions = "position_ids" in inspect.signature(base.forward).parameters
        self.batching = max_batch_size >= 2 and self.supported()
        self.max_batch_size = max_batch_size if self.batching else 1
        self.stop_ids = set(generator.stop_ids)
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._rows: list[Job] = []  # the batch, in order; only the decoding thread touches it
        self._cache: transformers.DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cached length), 0 over each row's left padding

    @torch.inference_mode()
    def supported(self) -> bool:
        """Whether the model's forward fills a stock ``DynamicCache`` of full-attention layers we can pad."""
        if getattr(self.model.config, "is_encoder_decoder", False):
            return False
        cache = transformers.DynamicCache()
        ids = torch.tensor([[self.generator.tokenizer.eos_token_id or 0] * 2], device=self.generator.device)
        try:
            with self.generator.lock:
                self._forward(ids, torch.ones_like(ids), torch.arange(2, device=ids.device)[None], cache)
        except (TypeError, ValueError):
            return False
        return (len(cache.layers) > 0 and all(type(layer) is transformers.DynamicLayer for layer in cache.layers)
                and cache.get_seq_length() == 2)

    def submit(self, job: Job) -> None:
        """Queue ``job``; its text goes to its streamer, which is ended when the job is done or stopped."""
        with self._wake:
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decoder", daemon=True)
                self._thread.start()
            self._wake.notify()

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            for job in self._admit():
                if self.batching and job.params.num_beams == 1:
                    self._prefill(job)
                else:
                    self._alone(job)
            if self._rows:
                self._step()

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit in the batch, in arrival order; jobs cancelled while waiting are dropped."""
        with self._wake:
            while not self._rows and not self._waiting:
                self._wake.wait()
            for job in [job for job in self._waiting if job.stop_event.is_set()]:
                self._waiting.remove(job)
                _end(job)  # its consumer is waiting for the end of its stream
            jobs = []
            while self._waiting and len(self._rows) + len(jobs) < self.max_batch_size:
                jobs.append(self._waiting.popleft())
            return jobs

    def _alone(self, job: Job) -> None:
        """Stock ``generate`` for one job; beam search cannot stream there, so its answer comes whole."""
        g, beams = self.generator, job.params.num_beams > 1
        ids = torch.tensor([job.prompt_ids], device=g.device)
        stopping = transformers.StoppingCriteriaList([_EventStop(job.stop_event)])
        streamer = {} if beams else {"streamer": job.streamer}
        try:
            with g.lock:
                out = g.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), stopping_criteria=stopping,
                                       **g.generate_kwargs(job.params), **streamer)
            if beams:
                job.streamer.on_finalized_text(g.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        except Exception as e:  # this request fails alone
            job.errors.append(e)
        _end(job)

    def _prefill(self, job: Job) -> None:
        """Encode ``job``'s prompt alone, choose its first token, and add its row to the batch."""
        job.ids = list(job.prompt_ids)
        job.processors = job.params.logits_processors()
        if job.params.sampling:  # its own random generator: a seeded answer does not depend on the batch
            job.rng = torch.Generator(self.generator.device)
            if job.params.seed is None:
                job.rng.seed()
            else:
                job.rng.manual_seed(job.params.seed)
        try:
            job.streamer.put(torch.tensor(job.prompt_ids))  # the streamer skips the first tokens it gets, the prompt
            with self.generator.lock:
                ids = torch.tensor([job.prompt_ids], device=self.generator.device)
                one = transformers.DynamicCache()
                logits = self._forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1], device=ids.device)[None],
                                       one)
                if not self._emit(job, self._choose([job], logits)[0]):
                    self._cache, self._mask = _join(self._cache, self._mask, one, torch.ones_like(ids))
                    self._rows.append(job)
                    return
        except Exception as e:  # this request fails alone
            job.errors.append(e)
        _end(job)

    def _step(self) -> None:
        """One token for every row; finished rows leave. An error (e.g. out of memory) fails every row."""
        rows = self._rows
        try:
            with self.generator.lock:
                last = torch.tensor([[job.ids[-1]] for job in rows], device=self.generator.device)
                mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
                logits = self._forward(last, mask, mask.sum(dim=1, keepdim=True) - 1, self._cache)
                finished = [self._emit(job, token) for job, token in zip(rows, self._choose(rows, logits), strict=True)]
                keep = [row for row, done in enumerate(finished) if not done]
                if len(keep) < len(rows):
                    self._cache, mask = _select(self._cache, mask, keep) if keep else (None, None)
        except Exception as e:
            finished, keep, self._cache, mask = [True] * len(rows), [], None, None
            for job in rows:
                job.errors.append(e)
        self._rows, self._mask = [rows[row] for row in keep], mask
        for job, done in zip(rows, finished, strict=True):
            if done:
                _end(job)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: transformers.DynamicCache) -> torch.Tensor:
        """Last-position logits of one forward pass, in float32 (as generate takes them)."""
        extra = {"position_ids": positions} if self.positions else {}
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def _choose(self, jobs: list[Job], logits: torch.Tensor) -> list[int]:
        """Each job's next token from its row of ``logits``, with its own settings and random generator
        (read back from the device once for the batch)."""
        scores = torch.cat([job.processors(torch.tensor([job.ids], device=logits.device), logits[row:row + 1])
                            for row, job in enumerate(jobs)])
        tokens = scores.argmax(dim=-1)
        for row, job in enumerate(jobs):
            if job.rng is not None:
                tokens[row] = torch.multinomial(torch.softmax(scores[row], dim=-1), 1, generator=job.rng)[0]
        return tokens.tolist()

    def _emit(self, job: Job, token: int) -> bool:
        """Hand ``token`` to the job's streamer; True when the job is finished."""
        job.ids.append(token)
        job.new_tokens += 1
        try:
            job.streamer.put(torch.tensor([token]))
        except RuntimeError:  # an asyncio caller's event loop is closed: nobody is listening
            return True
        return token in self.stop_ids or job.new_tokens >= job.params.max_new_tokens or job.stop_event.is_set()


class _EventStop(transformers.StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.event.is_set()


def _end(job: Job) -> None:
    """End ``job``'s stream (an asyncio caller whose event loop is gone hears nothing)."""
    with contextlib.suppress(RuntimeError):
        job.streamer.end()


def _join(cache: transformers.DynamicCache | None, mask: torch.Tensor | None, new: transformers.DynamicCache,
          new_mask: torch.Tensor) -> tuple[transformers.DynamicCache, torch.Tensor]:
    """The batch's cache and mask with ``new``'s rows added below, the shorter side left-padded."""
    if cache is None:
        return new, new_mask
    length = max(mask.shape[1], new_mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # left-pad dimension ``dim`` to ``length`` with zeros
        shape = list(t.shape)
        shape[dim] = length - t.shape[dim]
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    layers = [(torch.cat([pad(a.keys, 2), pad(b.keys, 2)]), torch.cat([pad(a.values, 2), pad(b.values, 2)]))
              for a, b in zip(cache.layers, new.layers, strict=True)]
    return transformers.DynamicCache(ddp_cache_data=layers), torch.cat([pad(mask, 1), pad(new_mask, 1)])


def _select(cache: transformers.DynamicCache, mask: torch.Tensor,
            rows: list[int]) -> tuple[transformers.DynamicCache, torch.Tensor]:
    """Only ``rows`` of the batch, without the leading columns that are padding in all of them."""
    index = torch.tensor(rows, device=mask.device)
    mask = mask[index]
    start = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())  # padding columns every kept row starts with
    layers = [(layer.keys[index, :, start:], layer.values[index, :, start:]) for layer in cache.layers]
    return transformers.DynamicCache(ddp_cache_data=layers), mask[:, start:]
