"""One generator for every script: prompts from the run's template, batched or streamed output."""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers

from alpaca_cot.data.templates import Template
from alpaca_cot.errors import UserError
from alpaca_cot.flags import flag

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.manual_seed and torch.Generator accept


@dataclass
class SamplingParams:
    """Decoding settings; the defaults are the ones the original Alpaca-CoT documented."""

    max_new_tokens: int = flag(256, "the longest answer, in tokens")
    do_sample: bool = flag(True, "sample (True) or decode greedily (False)")
    temperature: float = flag(1.0, "softmax temperature when sampling (0 = greedy)")
    top_p: float = flag(0.9, "nucleus sampling: keep the smallest set of tokens whose probability reaches this")
    top_k: int = flag(0, "keep only the k most likely tokens when sampling (0 = no cut)")
    num_beams: int = flag(1, "beam search width (1 = none)")
    no_repeat_ngram_size: int = flag(6, "never repeat an n-gram of this size (0 = off)")
    repetition_penalty: float = flag(1.8, "penalty on tokens already present (1.0 = off)")
    seed: int | None = flag(None, "random seed for sampling (reproducible answers)")

    def __post_init__(self) -> None:
        # fire and JSON clients pass numbers as str or int, booleans as "false"; coerce, then check.
        try:
            for name in ("max_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size"):
                setattr(self, name, int(getattr(self, name)))
            for name in ("temperature", "top_p", "repetition_penalty"):
                setattr(self, name, float(getattr(self, name)))
            if self.seed is not None:
                self.seed = int(self.seed)
        except (TypeError, ValueError) as e:
            raise UserError(f"Sampling settings must be numbers: {e}") from None
        if isinstance(self.do_sample, str):
            self.do_sample = self.do_sample.strip().lower() in ("1", "true", "yes")
        checks = [(self.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
                  (all(math.isfinite(getattr(self, k)) for k in ("temperature", "top_p", "repetition_penalty")),
                   "--temperature, --top_p and --repetition_penalty must be finite numbers"),
                  (self.temperature >= 0, "--temperature must be 0 or more"),
                  (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
                  (self.top_k >= 0, "--top_k must be 0 (off) or more"),
                  (self.num_beams >= 1, "--num_beams must be at least 1"),
                  (self.no_repeat_ngram_size >= 0, "--no_repeat_ngram_size must be 0 (off) or more"),
                  (self.repetition_penalty > 0, "--repetition_penalty must be above 0 (1.0 = off)"),
                  (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                   f"--seed must be an integer from {SEED_MIN} to {SEED_MAX} (what torch.manual_seed takes)")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (sampling knobs only when sampling)."""
        kw = {k: v for k, v in asdict(self).items() if k != "seed"}
        if not self.do_sample or self.temperature == 0:
            kw.update(do_sample=False)
            for key in ("temperature", "top_p", "top_k"):
                kw.pop(key)
        return kw  # top_k 0 is passed on: left out, generate would cut at its own default of 50

    def logits_processors(self) -> transformers.LogitsProcessorList:
        """The processors ``model.generate`` builds from these settings, in its order (penalties, then
        the sampling warpers): one request's token choice, applied row by row in a shared batch."""
        processors = transformers.LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(transformers.RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size > 0:
            processors.append(transformers.NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.sampling:
            if self.temperature != 1.0:
                processors.append(transformers.TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(transformers.TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(transformers.TopPLogitsWarper(self.top_p))
        return processors

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn (else the most likely one is taken)."""
        return self.do_sample and self.temperature > 0


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
        self.decoder: BatchedDecoder | None = None  # set by batch_streams

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

    def prompt_length(self, record: dict) -> int:
        """How many tokens the inference prompt of ``record`` takes."""
        prompt = self.prompt(record)
        with self.tokenizer_lock:
            return len(self.tokenizer(prompt, add_special_tokens=self.template.add_special_tokens)["input_ids"])

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with self.tokenizer_lock:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                   add_special_tokens=self.template.add_special_tokens)
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return {**params.generation_kwargs(), "eos_token_id": self.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id, "use_cache": True}

    def generate(self, records: list[dict], params: SamplingParams | None = None,
                 batch_size: int = 8) -> list[str]:
        """Answers for ``records``, in order: batches of similar length, left-padded, KV cache on."""
        answers: list[str] = [""] * len(records)
        for batch in self.generate_batches(records, params, batch_size):
            for i, answer in batch:
                answers[i] = answer
        return answers

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
            batch = self._encode([prompts[i] for i in chunk])
            with self.lock:
                out = self.model.generate(**batch, **self._generate_kwargs(params))
            new = out[:, batch["input_ids"].shape[1]:]
            yield [(i, self.template.cut_response(self.tokenizer.decode(new[row], skip_special_tokens=True)))
                   for row, i in enumerate(chunk)]

    def batch_streams(self, max_batch_size: int) -> bool:
        """From now on, concurrent ``stream`` calls decode together, up to ``max_batch_size`` at a time.

        A stream joins the running batch at the next token and leaves it when done; requests beyond
        ``max_batch_size`` wait their turn in arrival order. Each keeps its own sampling settings and seed,
        and a greedy answer is the one ``generate`` gives alone. Returns False, and streams stay one at a
        time, when the model cannot be batched this way (its forward pass takes no stock ``DynamicCache``)
        or ``max_batch_size`` is 1.
        """
        if max_batch_size < 2:
            self.decoder = None
            return False
        decoder = BatchedDecoder(self, max_batch_size)
        if not decoder.supported():
            return False
        self.decoder = decoder
        return True

    def stream(self, record: dict, params: SamplingParams | None = None,
               stop_event: threading.Event | None = None) -> Iterator[str]:
        """Yield answer text pieces as they are generated; setting ``stop_event`` ends generation.

        Text that could begin a template stop string, and trailing spaces, are held back until they
        are known not to end the answer; the rest is sent at once.
        Beam search cannot stream in transformers: its answer comes as one piece.
        """
        params = params or SamplingParams()
        if params.num_beams > 1:
            answer = self.generate([record], params, batch_size=1)[0]
            if answer:
                yield answer
            return
        stop_event = stop_event or threading.Event()
        batch = self._encode([self.prompt(record)])
        streamer = transformers.TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error: list[BaseException] = []
        thread = None
        if self.decoder is not None:
            self.decoder.submit(_Job(batch["input_ids"][0].tolist(), params, streamer, stop_event, error))
        else:
            stopping = transformers.StoppingCriteriaList([_EventStop(stop_event)])

            def work() -> None:
                try:
                    with torch.inference_mode(), self.lock:
                        self.model.generate(**batch, **self._generate_kwargs(params), streamer=streamer,
                                            stopping_criteria=stopping)
                except BaseException as e:  # re-raised in the consumer's thread below
                    error.append(e)
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
        answer = _AnswerText(self.template.stop_strings)
        try:
            for piece in streamer:
                if text := answer.feed(piece):
                    yield text
                if answer.done:
                    break
            if text := answer.rest():
                yield text
        finally:
            stop_event.set()  # a consumer that stops early (client gone) frees the model
            if thread is not None:
                thread.join()
        if error:
            raise error[0]

    async def stream_async(self, prompt_ids: list[int], params: SamplingParams,
                           stop_event: threading.Event) -> AsyncIterator[str]:
        """``stream`` for an asyncio caller once ``batch_streams`` is on, from the prompt's token ids: the
        decoder hands its text straight to the event loop (no thread per request). Sampling only, no beams."""
        if self.decoder is None or params.num_beams > 1:
            raise ValueError("stream_async needs batch_streams on and num_beams 1")
        streamer = transformers.AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error: list[BaseException] = []
        self.decoder.submit(_Job(list(prompt_ids), params, streamer, stop_event, error))
        answer = _AnswerText(self.template.stop_strings)
        try:
            async for piece in streamer:
                if text := answer.feed(piece):
                    yield text
                if answer.done:
                    break
            if text := answer.rest():
                yield text
        finally:
            stop_event.set()  # the decoder drops the row at its next step
        if error:
            raise error[0]


class _AnswerText:
    """An answer's streamed text: leading spaces dropped, cut at the first template stop string; text
    that could begin one, and trailing spaces, held back until they are known not to end the answer."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text, self.emitted, self.done = "", 0, False

    def feed(self, piece: str) -> str:
        """The text that can be sent now that ``piece`` arrived ("" if none); ``done`` once a stop string came."""
        text = self.text + piece
        self.text = text.lstrip() if self.emitted == 0 else text
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        if hits:
            self.text, self.done = self.text[:min(hits)], True
            return ""
        safe = len(self.text[:len(self.text) - _stop_start_length(self.text, self.stops)].rstrip())
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:safe], safe
        return out

    def rest(self) -> str:
        """What was held back and belongs to the answer, once the stream is over."""
        return self.text.rstrip()[self.emitted:]


def _stop_start_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class _EventStop(transformers.StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.event.is_set()


@dataclass
class _Job:
    """One stream in the batched decoder: its prompt, settings, and where its tokens and errors go."""

    prompt_ids: list[int]
    params: SamplingParams
    streamer: transformers.TextIteratorStreamer
    stop_event: threading.Event
    errors: list[BaseException]
    ids: list[int] = field(default_factory=list)  # prompt and answer so far (the penalties read them)
    new_tokens: int = 0
    processors: transformers.LogitsProcessorList | None = None
    rng: torch.Generator | None = None


class BatchedDecoder:
    """Continuous batching over the stock forward pass and ``DynamicCache``: one thread decodes every
    admitted stream, one token per step for all of them in one forward pass.

    A new stream's prompt is encoded alone (batch of one, as ``generate`` would), then its cache is
    left-padded into the batch's; the attention mask hides the padding and each row gets its own
    position ids. A finished or cancelled row leaves the batch at once, and columns that are padding
    in every remaining row are dropped, so the cache never outgrows the longest live sequence.
    """

    def __init__(self, generator: Generator, max_batch_size: int):
        self.generator = generator
        self.model = generator.model
        self.max_batch_size = max_batch_size
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # As generate does: only models whose forward takes position ids get them (Bloom's ALiBi reads the mask).
        self.positions = "position_ids" in inspect.signature(base.forward).parameters
        self.stop_ids = set(generator.stop_ids)
        self._waiting: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

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

    def submit(self, job: _Job) -> None:
        """Queue ``job``; its tokens go to its streamer, which is ended when the job is done or stopped."""
        job.ids = list(job.prompt_ids)
        job.streamer.put(torch.tensor(job.prompt_ids))  # the streamer skips the first tokens it gets, the prompt
        job.processors = job.params.logits_processors()
        if job.params.sampling:
            job.rng = torch.Generator(self.generator.device)
            if job.params.seed is None:
                job.rng.seed()
            else:
                job.rng.manual_seed(job.params.seed)
        with self._wake:
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batched-decoder", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: transformers.DynamicCache) -> torch.Tensor:
        """Last-position logits of one forward pass, in float32 (as generate takes them)."""
        extra = {"position_ids": positions} if self.positions else {}
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def _choose(self, jobs: list[_Job], logits: torch.Tensor) -> list[int]:
        """Each job's next token from its row of ``logits``, with its own settings and random generator
        (read back from the device once for the batch)."""
        scores = torch.cat([job.processors(torch.tensor([job.ids], device=logits.device), logits[row:row + 1])
                            for row, job in enumerate(jobs)])
        tokens = scores.argmax(dim=-1)
        for row, job in enumerate(jobs):
            if job.rng is not None:
                tokens[row] = torch.multinomial(torch.softmax(scores[row], dim=-1), 1, generator=job.rng)[0]
        return tokens.tolist()

    def _emit(self, job: _Job, token: int) -> bool:
        """Hand ``token`` to the job's streamer; True when the job is finished."""
        job.ids.append(token)
        job.new_tokens += 1
        try:
            job.streamer.put(torch.tensor([token]))
        except RuntimeError:  # an asyncio caller's event loop is closed: nobody is listening
            return True
        return token in self.stop_ids or job.new_tokens >= job.params.max_new_tokens or job.stop_event.is_set()

    def _admit(self, active: int) -> list[_Job]:
        """Waiting jobs that fit in the batch, in arrival order; jobs cancelled while waiting are dropped."""
        with self._wake:
            while not active and not self._waiting:
                self._wake.wait()
            for job in [job for job in self._waiting if job.stop_event.is_set()]:
                self._waiting.remove(job)
                _end(job)  # its consumer is waiting for the end of its stream
            jobs = []
            while self._waiting and active + len(jobs) < self.max_batch_size:
                jobs.append(self._waiting.popleft())
            return jobs

    @torch.inference_mode()
    def _run(self) -> None:
        jobs: list[_Job] = []  # the batch's rows, in order
        cache, mask = None, None  # mask: (rows, cached length), 0 over each row's left padding
        while True:
            for job in self._admit(len(jobs)):
                try:
                    with self.generator.lock:
                        ids = torch.tensor([job.prompt_ids], device=self.generator.device)
                        one = transformers.DynamicCache()
                        logits = self._forward(ids, torch.ones_like(ids),
                                               torch.arange(ids.shape[1], device=ids.device)[None], one)
                        if not self._emit(job, self._choose([job], logits)[0]):
                            cache, mask = _join(cache, mask, one, torch.ones_like(ids))
                            jobs.append(job)
                            continue
                except Exception as e:  # this request fails alone
                    job.errors.append(e)
                _end(job)
            if not jobs:
                continue
            try:
                with self.generator.lock:
                    last = torch.tensor([[job.ids[-1]] for job in jobs], device=self.generator.device)
                    mask = torch.cat([mask, mask.new_ones(len(jobs), 1)], dim=1)
                    positions = mask.sum(dim=1, keepdim=True) - 1
                    logits = self._forward(last, mask, positions, cache)
                    finished = [self._emit(job, token) for job, token in zip(jobs, self._choose(jobs, logits),
                                                                             strict=True)]
            except Exception as e:  # the whole batch failed (e.g. out of memory): every row hears it
                finished = [True] * len(jobs)
                for job in jobs:
                    job.errors.append(e)
            if any(finished):
                for job, done in zip(jobs, finished, strict=True):
                    if done:
                        _end(job)
                keep = [row for row, done in enumerate(finished) if not done]
                jobs = [jobs[row] for row in keep]
                cache, mask = _select(cache, mask, keep) if jobs else (None, None)


def _end(job: _Job) -> None:
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
