"""One generator for every script: prompts from the run's template, batched or streamed output."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers

from alpaca_cot.errors import UserError
from alpaca_cot.templates import Template


@dataclass
class SamplingParams:
    """Decoding settings; the defaults are the ones the original Alpaca-CoT documented."""

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0 = no top-k cut
    num_beams: int = 1
    no_repeat_ngram_size: int = 6
    repetition_penalty: float = 1.8
    seed: int | None = None

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
                  (self.temperature >= 0, "--temperature must be 0 or more"),
                  (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
                  (self.top_k >= 0, "--top_k must be 0 (off) or more"),
                  (self.num_beams >= 1, "--num_beams must be at least 1"),
                  (self.no_repeat_ngram_size >= 0, "--no_repeat_ngram_size must be 0 (off) or more"),
                  (self.repetition_penalty > 0, "--repetition_penalty must be above 0 (1.0 = off)")]
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
        elif not self.top_k:
            kw.pop("top_k")
        return kw


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
        stopping = transformers.StoppingCriteriaList([_EventStop(stop_event)])
        error: list[BaseException] = []

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
        stops = self.template.stop_strings
        text, emitted = "", 0
        try:
            for piece in streamer:
                text += piece
                if emitted == 0:
                    text = text.lstrip()
                hits = [text.find(s) for s in stops if s in text]
                if hits:
                    text = text[:min(hits)]
                    break
                safe = len(text[:len(text) - _stop_start_length(text, stops)].rstrip())
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            rest = text.rstrip()[emitted:]
            if rest:
                yield rest
        finally:
            stop_event.set()  # a consumer that stops early (client gone) frees the model
            thread.join()
        if error:
            raise error[0]


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
