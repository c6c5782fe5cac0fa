"""The built-in CoT evaluation of one ``--data`` entry: prompts (zero- or few-shot), generations
(resumable, through ``alpaca_cot.prediction``), scores (``alpaca_cot.evaluation.answers``) and the
eval loss: the mean cross-entropy per answer token of the reference given the zero-shot prompt (as
training's eval loss)."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from alpaca_cot.config import EvaluateArgs
from alpaca_cot.data.records import read_records
from alpaca_cot.data.sources import load_registry, resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.evaluation.answers import question_of, reference_of, score_record
from alpaca_cot.evaluation.stats import proportion
from alpaca_cot.io import write_json_atomic, write_text_atomic
from alpaca_cot.prediction import PREDICTION_FIELD, PredictionRun

KINDS = ("letter", "number", "yesno", "text")


def data_name(source: str) -> str:
    """A short name for a ``--data`` entry: the registry name, else the file or folder name."""
    if source in load_registry() and not os.path.exists(source):
        return source
    return os.path.splitext(os.path.basename(os.path.normpath(source)))[0] or "data"


def build_items(records: list[dict], count: int, num_fewshot: int, seed: int) -> list[dict]:
    """The prompt records of the first ``count`` records: zero-shot, the record without its answer;
    few-shot, a conversation of ``num_fewshot`` other records of the set (chosen by ``seed`` and the
    record's position) answered as the data answers them, then the question."""
    if num_fewshot and num_fewshot >= len(records):
        raise UserError(f"--num_fewshot {num_fewshot} needs more records than the {len(records)} of the data set; "
                        f"pass at most {len(records) - 1}")
    items = []
    for i, record in enumerate(records[:count]):
        if num_fewshot:
            others = [j for j in range(len(records)) if j != i]
            shots = random.Random(f"{seed}:{i}").sample(others, num_fewshot)
            turns = [turn for j in shots for turn in _as_turns(records[j])]
            prompt: dict = {"messages": turns + [{"role": "user", "content": question_of(record)}]}
        elif "messages" in record:
            messages = record["messages"]
            prompt = {"messages": messages[:-1] if messages[-1]["role"] == "assistant" else messages}
        else:
            prompt = {"instruction": record["instruction"], "input": record.get("input", "")}
        items.append({"index": i, **prompt})
    return items


def _as_turns(record: dict) -> list[dict]:
    if "messages" in record:
        return [turn for turn in record["messages"] if turn["role"] != "system"]
    return [{"role": "user", "content": question_of(record)},
            {"role": "assistant", "content": record["output"]}]


class LazyModel:
    """(model, tokenizer, template) loaded on first use: a finished rerun loads nothing."""

    def __init__(self, loader_kwargs: dict):
        self.loader_kwargs = loader_kwargs
        self.loaded: tuple[Any, Any, Any] | None = None

    def get(self) -> tuple[Any, Any, Any]:
        """The loaded triple (through ``alpaca_cot.models.loading.load_for_inference``)."""
        if self.loaded is None:
            from alpaca_cot.models.loading import load_for_inference

            self.loaded = load_for_inference(**self.loader_kwargs)
        return self.loaded


def evaluate_data(source: str, model: LazyModel, sampling: Any, args: EvaluateArgs) -> dict:
    """Generate (resumably) and score every record of one ``--data`` entry; the entry's results."""
    from alpaca_cot.generation.generator import Generator

    pool = [r for path in resolve_data([source]) for r in read_records(path)]  # few-shot examples come from all
    count = min(len(pool), args.max_samples or len(pool))
    records = pool[:count]
    name = data_name(source)
    folder = os.path.join(args.output_dir, "generations")
    os.makedirs(folder, exist_ok=True)
    run = PredictionRun(build_items(pool, count, args.num_fewshot, args.fewshot_seed),
                        os.path.join(folder, f"{name}.jsonl"), sources=[source])
    start = time.perf_counter()
    if run.todo:
        print(f"{name}: {count - len(run.todo)} of {count} records already generated; generating {len(run.todo)}",
              flush=True)
        run.predict(Generator(*model.get()), sampling, args.eval_batch_size)
    rows = []
    for item, record in zip(run.finish(), records, strict=True):
        generation = item[PREDICTION_FIELD]
        scored = score_record(record, generation) or dict.fromkeys(
            ("kind", "answer", "extracted", "stated", "exact_match", "correct"))
        prompt = {k: v for k, v in item.items() if k not in ("index", PREDICTION_FIELD)}
        rows.append({"index": item["index"], "prompt": prompt, "generation": generation,
                     "reference": reference_of(record), **scored})
    write_text_atomic(os.path.join(folder, f"{name}.scored.jsonl"),
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    scored_count = sum(row["kind"] is not None for row in rows)
    result = {"data": source, "records": count, "scored": scored_count, "without_final_answer": count - scored_count,
              "num_fewshot": args.num_fewshot,
              **{key: proportion(sum(bool(row[field]) for row in rows), scored_count)
                 for key, field in (("accuracy", "correct"), ("exact_match", "exact_match"), ("stated", "stated"))},
              "kinds": {kind: sum(row["kind"] == kind for row in rows) for kind in KINDS},
              "generations": os.path.join("generations", f"{name}.scored.jsonl")}
    if args.eval_loss:
        result["eval_loss"] = _cached_loss(os.path.join(folder, f"{name}.loss.json"), model, records, args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _cached_loss(path: str, model: LazyModel, records: list[dict], args: EvaluateArgs) -> float:
    """The eval loss saved at ``path`` by an earlier run, else computed and saved there."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["eval_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    loss = answer_loss(*model.get(), records, args.cutoff_len, args.eval_batch_size)
    write_json_atomic(path, {"eval_loss": loss})
    return loss


def answer_loss(model: Any, tokenizer: Any, template: Any, records: list[dict], cutoff_len: int,
                batch_size: int) -> float:
    """Mean cross-entropy per answer token of ``records`` (prompt masked, as in training)."""
    import torch

    from alpaca_cot.data.encoding import IGNORE_INDEX, encode_records

    encoded = [e for e in encode_records(records, template, tokenizer, cutoff_len) if
               any(label != IGNORE_INDEX for label in e.labels)]
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(e.input_ids) for e in batch)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch], device=device)
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch],
                                device=device)
            labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in batch], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
    return total / tokens if tokens else float("nan")
