"""The model's one decoding thread: streams queue in arrival order and decode together (continuous batching)."""

from __future__ import annotations

import collections
import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from alpaca_cot.generation.sampling import SamplingParams

# The id over each row's left padding: past every vocabulary, so the stock penalty and n-gram processors
# (which clamp ids to the vocabulary's size and drop that column) never count it.
PAD = torch.iinfo(torch.long).max


@dataclass
class Job:
    """One stream: its prompt, settings, and where its tokens and errors go."""

    prompt_ids: list[int]
    params: SamplingParams
    streamer: transformers.TextIteratorStreamer
    stop_event: threading.Event
    errors: list[BaseException] = field(default_factory=list)
    new_tokens: int = 0
    processors: transformers.LogitsProcessorList | None = None
    rng: torch.Generator | None = None


class BatchedDecoder:
    """One thread decodes every stream of a ``Generator``, in arrival order: batched (one token for every row
    per forward pass, over the stock forward and ``DynamicCache``), or by stock ``generate`` one at a time
    (beam search, ``max_batch_size`` 1, or a model that cannot be batched). A new row's prompt is encoded
    alone, then its cache is left-padded into the batch's (the mask hides the padding; each row has its own
    position ids); a finished or cancelled row leaves at once, with the columns that only it needed. A step
    reads the device once: the chosen tokens (see ``_choose``). An error fails only the requests it touched."""

    def __init__(self, generator: Any, max_batch_size: int):  # a Generator (which imports this module)
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
        self._ids: torch.Tensor | None = None  # (rows, cached length + 1): prompt and answer, PAD over the padding

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
        try:
            job.processors = job.params.logits_processors()
            if job.params.sampling:  # its own random generator: a seeded answer does not depend on the batch
                job.rng = torch.Generator(self.generator.device)
                job.rng.seed() if job.params.seed is None else job.rng.manual_seed(job.params.seed)
            job.streamer.put(torch.tensor(job.prompt_ids))  # the streamer skips the first tokens it gets, the prompt
            with self.generator.lock:
                ids = torch.tensor([job.prompt_ids], device=self.generator.device)
                one = transformers.DynamicCache()
                logits = self._forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1], device=ids.device)[None],
                                       one)
                token = self._choose([job], ids, logits)
                if not self._emit(job, token.tolist()[0]):
                    self._cache, self._mask, self._ids = _join(self._cache, self._mask, self._ids, one,
                                                               torch.ones_like(ids), torch.cat([ids[0], token])[None])
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
                mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
                logits = self._forward(self._ids[:, -1:], mask, mask.sum(dim=1, keepdim=True) - 1, self._cache)
                tokens = self._choose(rows, self._ids, logits)
                ids = torch.cat([self._ids, tokens[:, None]], dim=1)
                finished = [self._emit(job, token) for job, token in zip(rows, tokens.tolist(), strict=True)]
                keep = [row for row, done in enumerate(finished) if not done]
                if len(keep) < len(rows):  # drop the columns that are padding in every kept row
                    start = ids.shape[1] - max((len(rows[row].prompt_ids) + rows[row].new_tokens for row in keep),
                                               default=0)
                    self._cache, mask, ids = _select(self._cache, mask, ids, keep, start) if keep else (None,) * 3
        except Exception as e:
            finished, keep, self._cache, mask, ids = [True] * len(rows), [], None, None, None
            for job in rows:
                job.errors.append(e)
        self._rows, self._mask, self._ids = [rows[row] for row in keep], mask, ids
        for job, done in zip(rows, finished, strict=True):
            if done:
                _end(job)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: transformers.DynamicCache) -> torch.Tensor:
        """Last-position logits of one forward pass, in float32 (as generate takes them)."""
        extra = {"position_ids": positions} if self.positions else {}
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def _choose(self, jobs: list[Job], ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row, on the device: the logits processors run once over the rows that share
        settings (once over the batch when all do), given ``ids`` (each row's prompt and answer, PAD-padded on
        the left: the stock processors ignore ids past the vocabulary); sampled rows draw with their own random
        generator. No read from the device."""
        groups: dict[tuple, list[int]] = {}
        for row, job in enumerate(jobs):
            groups.setdefault(_choice_key(job.params), []).append(row)
        if len(groups) == 1:
            scores = jobs[0].processors(ids, logits)
        else:
            scores = torch.empty_like(logits)
            for rows in groups.values():
                index = torch.tensor(rows, device=logits.device)
                scores[index] = jobs[rows[0]].processors(ids[index], logits[index])
        tokens = scores.argmax(dim=-1)
        drawn = [row for row, job in enumerate(jobs) if job.rng is not None]
        if drawn:
            probs = torch.softmax(scores[drawn], dim=-1)
            for i, row in enumerate(drawn):
                tokens[row] = torch.multinomial(probs[i], 1, generator=jobs[row].rng)[0]
        return tokens

    def _emit(self, job: Job, token: int) -> bool:
        """Hand ``token`` to the job's streamer; True when the job is finished."""
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


def _choice_key(params: SamplingParams) -> tuple:
    """The settings that shape a row's token choice (rows with equal keys are processed together)."""
    warpers = (params.temperature, params.top_k, params.top_p) if params.sampling else ()
    return params.repetition_penalty, params.no_repeat_ngram_size, *warpers


def _join(cache: transformers.DynamicCache | None, mask: torch.Tensor | None, ids: torch.Tensor | None,
          new: transformers.DynamicCache, new_mask: torch.Tensor,
          new_ids: torch.Tensor) -> tuple[transformers.DynamicCache, torch.Tensor, torch.Tensor]:
    """The batch's cache, mask and ids with ``new``'s row added below, the shorter side left-padded."""
    if cache is None:
        return new, new_mask, new_ids
    length = max(mask.shape[1], new_mask.shape[1])

    def pad(t: torch.Tensor, dim: int, value: int = 0, extra: int = 0) -> torch.Tensor:  # left-pad to ``length``
        shape = list(t.shape)
        shape[dim] = length + extra - t.shape[dim]
        return torch.cat([t.new_full(shape, value), t], dim=dim)

    layers = [(torch.cat([pad(a.keys, 2), pad(b.keys, 2)]), torch.cat([pad(a.values, 2), pad(b.values, 2)]))
              for a, b in zip(cache.layers, new.layers, strict=True)]
    return (transformers.DynamicCache(ddp_cache_data=layers), torch.cat([pad(mask, 1), pad(new_mask, 1)]),
            torch.cat([pad(ids, 1, PAD, 1), pad(new_ids, 1, PAD, 1)]))


def _select(cache: transformers.DynamicCache, mask: torch.Tensor, ids: torch.Tensor, rows: list[int],
            start: int) -> tuple[transformers.DynamicCache, torch.Tensor, torch.Tensor]:
    """Only ``rows`` of the batch, from column ``start`` of ``ids`` on (the columns before are padding)."""
    index = torch.tensor(rows, device=mask.device)
    layers = [(layer.keys[index, :, start:], layer.values[index, :, start:]) for layer in cache.layers]
    return transformers.DynamicCache(ddp_cache_data=layers), mask[index, start:], ids[index, start:]
