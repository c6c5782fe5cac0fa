"""Decoding settings: one request's sampling flags, as ``model.generate`` and the batched decoder take them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import transformers

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
