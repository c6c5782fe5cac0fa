"""evaluate.py on preference pairs: how often a model ranks the chosen reply above the rejected one.

Each pair is encoded as training encodes it (``alpaca_cot.data.pairs.encode_pair``: our template, our
truncation); a reply's log-probability is the sum over its tokens given the prompt (as TRL's DPO sums it).
Two rankings, each a proportion with its Wilson 95% interval; a tie counts as wrong:

- ``reward_accuracy``: the implicit reward of DPO, the policy's log-probability margin over the reference,
  ``(chosen - ref_chosen) - (rejected - ref_rejected) > 0``. The reference is the base model (the adapter
  disabled), or the adapter a run started from (its saved ``lora_dir``). Without an adapter the policy is
  the reference and every margin is 0, so a base model has no reward accuracy (null).
- ``logp_accuracy``: the policy's own ``chosen > rejected`` (and per token: ``chosen_per_token``), defined
  for any model, so a base model and its adapter are compared on the same measure.

The margin is reported raw (nats), and times beta where the run's ``finetune_args.json`` gives one (the
reward TRL logs). Per pair scores go to ``generations/NAME.pairs.jsonl``; a rerun with the same settings
reads them back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from alpaca_cot.config import EvaluateArgs
from alpaca_cot.data.records import DataError, iter_records, read_records, record_kind
from alpaca_cot.data.sources import resolve_data
from alpaca_cot.evaluation.stats import percent, proportion
from alpaca_cot.io import write_text_atomic

SIDES = ("chosen", "rejected")


def data_kind(source: str) -> str:
    """"sft" or "pairs" for one ``--data`` entry (by its files' first rows); KTO files and entries whose
    files differ in kind are refused in one line."""
    kinds = {}
    for path in resolve_data([source]):
        first = next(iter_records(path), None)
        kinds[path] = record_kind(first[1]) if first else "sft"
    found = set(kinds.values())
    if "kto" in found:
        path = next(p for p, k in kinds.items() if k == "kto")
        raise DataError(f"{path}: KTO records (one reply with a label) cannot be ranked; evaluate.py scores "
                        "SFT records and preference pairs ('chosen' and 'rejected')")
    if len(found) > 1:
        raise DataError(f"--data {source}: holds both SFT records and preference pairs; give them as separate "
                        "--data entries (each is scored by its kind)")
    return found.pop() if found else "sft"


def preference_run(lora_dir: str | None) -> tuple[float | None, str | None]:
    """(beta, starting adapter) of the preference run saved in ``lora_dir`` (its finetune_args.json): the beta
    of a DPO run (other stages' beta does not scale this margin), and the adapter the run started from, its
    reference; (None, None) for an SFT run, a foreign adapter or a base model."""
    from alpaca_cot.models.loading import resolve_lora_dir, saved_run_args

    saved = saved_run_args(resolve_lora_dir(lora_dir)) if lora_dir else None
    if saved is None or saved.stage == "sft":
        return None, None
    return (saved.pref_beta if saved.stage == "dpo" else None), saved.lora_dir


def evaluate_pairs(source: str, model: Any, args: EvaluateArgs, run: tuple[float | None, str | None]) -> dict:
    """Score every pair of one ``--data`` entry (the first ``--max_samples``) with ``model`` (a LazyModel);
    ``run``: ``preference_run``'s (beta, starting adapter)."""
    from alpaca_cot.evaluation.generative import data_name

    beta, start = run
    records = [r for path in resolve_data([source]) for r in read_records(path, kind="pairs")]
    records = records[:args.max_samples or len(records)]
    name = data_name(source)
    path = os.path.join(args.output_dir, "generations", f"{name}.pairs.jsonl")
    rows = _read_rows(path, len(records))
    if rows is None:
        print(f"{name}: scoring {len(records)} preference pairs", flush=True)
        policy, tokenizer, template = model.get()
        if start and is_peft(policy) and "reference" not in policy.peft_config:
            from alpaca_cot.models.loading import resolve_lora_dir

            policy.load_adapter(resolve_lora_dir(start), adapter_name="reference")
        rows = score_pairs(policy, tokenizer, template, records, args.cutoff_len, args.eval_batch_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    has_reference = any(r["ref_chosen_logp"] is not None for r in rows)
    reference = start or ("the base model (adapter disabled)" if has_reference else None)
    return {"kind": "pairs", "data": source, "scores": os.path.relpath(path, args.output_dir),
            "reference": reference, **summarize(rows, beta)}


def _read_rows(path: str, count: int) -> list[dict] | None:
    """The scores an earlier run with the same settings wrote (the output folder's marker vouches for them)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    except (OSError, ValueError):
        return None
    return rows if len(rows) == count else None


def summarize(rows: list[dict], beta: float | None) -> dict:
    """The accuracies (Wilson 95% intervals, ties wrong), mean margins and mean log-probabilities of ``rows``;
    ``ref_*``: the reference's own rankings and log-probabilities (a DPO run's "before", measured alike)."""
    everything, rows = rows, [r for r in rows if r["chosen_logp"] is not None]
    n = len(rows)
    has_reference = bool(rows) and rows[0]["ref_chosen_logp"] is not None
    margins = [(r["chosen_logp"] - r["ref_chosen_logp"]) - (r["rejected_logp"] - r["ref_rejected_logp"])
               for r in rows] if has_reference else []
    margin = sum(margins) / n if margins else None
    result = {"pairs": n, "truncated": sum(r["truncated"] for r in everything), "left_out": len(everything) - n,
              "reward_accuracy": proportion(sum(m > 0 for m in margins), n) if has_reference else None,
              "reward_margin": margin, "beta": beta,
              "beta_reward_margin": beta * margin if beta is not None and margin is not None else None}
    for ref in ("", "ref_") if has_reference else ("",):
        chosen, rejected = [r[f"{ref}chosen_logp"] for r in rows], [r[f"{ref}rejected_logp"] for r in rows]
        per_token = [(c / max(r["chosen_tokens"], 1), j / max(r["rejected_tokens"], 1))
                     for c, j, r in zip(chosen, rejected, rows, strict=True)]
        result |= {f"{ref}logp_accuracy": proportion(sum(c > j for c, j in zip(chosen, rejected, strict=True)), n),
                   f"{ref}logp_accuracy_per_token": proportion(sum(c > j for c, j in per_token), n),
                   f"{ref}chosen_logp": sum(chosen) / n if n else None,
                   f"{ref}rejected_logp": sum(rejected) / n if n else None}
    return result


def score_pairs(model: Any, tokenizer: Any, template: Any, records: list[dict], cutoff_len: int,
                batch_size: int) -> list[dict]:
    """Per pair: the policy's (and, for an adapter, the reference's) summed log-probabilities of the chosen
    and rejected replies (None for a pair left out), their token counts and whether ``cutoff_len`` cut it."""
    from alpaca_cot.data.pairs import encode_pair

    encoded = [encode_pair(record, template, tokenizer, cutoff_len) for record in records]
    rows = [{"index": i, "truncated": e["truncated"], **{f"{side}_tokens": len(e[f"{side}_ids"]) for side in SIDES},
             **{f"{ref}{side}_logp": None for ref in ("", "ref_") for side in SIDES}} for i, e in enumerate(encoded)]
    # A reply cut to nothing (the prompt fills --cutoff_len) has no log-probability to compare: left out.
    kept = [i for i, e in enumerate(encoded) if e["chosen_ids"] and e["rejected_ids"]]
    for start in range(0, len(kept), batch_size):
        batch = kept[start:start + batch_size]
        seqs = [(encoded[i]["prompt_ids"], encoded[i][f"{side}_ids"]) for i in batch for side in SIDES]
        scores = {"": reply_logps(model, tokenizer, seqs)}
        with reference_model(model) as ref:
            if ref is not None:
                scores["ref_"] = reply_logps(ref, tokenizer, seqs)
        for k, i in enumerate(batch):
            rows[i].update({f"{ref}{side}_logp": values[2 * k + j] for ref, values in scores.items()
                            for j, side in enumerate(SIDES)})
    return rows


@contextlib.contextmanager
def reference_model(model: Any) -> Iterator[Any]:
    """The reference of a PEFT model: the adapter the run started from where one was loaded as
    "reference", else the base (adapter disabled); None for a model without an adapter."""
    if not is_peft(model):
        yield None
    elif "reference" in getattr(model, "peft_config", {}):
        active = model.active_adapter
        model.set_adapter("reference")
        try:
            yield model
        finally:
            model.set_adapter(active)
    else:
        with model.disable_adapter():
            yield model


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (an adapter over a base that can be disabled)."""
    import peft

    return isinstance(model, peft.PeftModel)


def reply_logps(model: Any, tokenizer: Any, seqs: list[tuple[list[int], list[int]]]) -> list[float]:
    """The summed log-probability of each ``(prompt_ids, reply_ids)``'s reply given its prompt, in one batch."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) + len(r) for p, r in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Right padding, so every row starts at position 0 as in training.
    ids = torch.tensor([p + r + [pad] * (width - len(p) - len(r)) for p, r in seqs], device=device)
    mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in seqs], device=device)
    out = []
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (p, r) in enumerate(seqs):
            # Position t predicts token t + 1; one row at a time keeps the fp32 copy small.
            logprobs = torch.log_softmax(logits[row, len(p) - 1:len(p) + len(r) - 1].float(), dim=-1)
            out.append(logprobs.gather(-1, torch.tensor(r, device=device)[:, None]).sum().item())
    return out


def render_pairs_table(data: dict[str, dict]) -> list[str]:
    """Markdown rows of the preference sets in ``data`` (results["data"]); [] when there are none."""
    rows = {name: r for name, r in data.items() if r.get("kind") == "pairs"}
    if not rows:
        return []
    lines = ["| pairs | count | reward accuracy [95% CI] | mean margin (x beta) | chosen > rejected [95% CI] "
             "| per token [95% CI] | chosen logp | rejected logp |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        reward = percent(r["reward_accuracy"]) if r["reward_accuracy"] else "n/a (no adapter)"
        margin = "n/a" if r["reward_margin"] is None else f"{r['reward_margin']:.3f}" + (
            f" ({r['beta_reward_margin']:.3f})" if r["beta_reward_margin"] is not None else "")
        lines.append(f"| {name} | {r['pairs']} | {reward} | {margin} | {percent(r['logp_accuracy'])} "
                     f"| {percent(r['logp_accuracy_per_token'])} | {r['chosen_logp']:.2f} | {r['rejected_logp']:.2f} |")
    return lines
