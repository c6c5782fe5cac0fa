"""Evaluation: chain-of-thought exact match on our data files, and standard benchmarks through
lm-evaluation-harness, into one output folder.

Built-in CoT evaluation: each record's reference gives a final answer (our CoT phrasings are read
back with ``split_cot``; other references through ``alpaca_cot.evaluation.answers``: "So the answer is X.",
"#### N", an option letter; a short reference is the answer itself). Its kind is ``letter``,
``number``, ``yesno`` or ``text``. Two scores per record, as lm-evaluation-harness reports GSM8K:

- ``exact_match`` (strict): the generation states the answer the way the data phrases it (the last
  "the answer is X" / "Answer: X" / "#### X" cue), or is the answer alone;
- ``accuracy`` (flexible): strict, or else the answer found anywhere in the generation (the last
  number, the leading or last yes/no, an option letter or an option's text).

Both come with Wilson 95% confidence intervals. The eval loss is the mean cross-entropy per
answer token of the reference given the zero-shot prompt (as training's eval loss).

Output folder (``--output_dir``): ``results.json``, ``results.md`` (the Markdown table) and
``generations/NAME.jsonl`` (each record's prompt, generation, extracted and reference answers),
all written atomically. ``run.json`` marks the folder as evaluate.py's and holds the settings; a
rerun with the same settings resumes the generations where a killed run stopped (the machinery of
``alpaca_cot.prediction``), a rerun with other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

from alpaca_cot.data.cot import split_cot
from alpaca_cot.data.records import read_records
from alpaca_cot.data.sources import load_registry, resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.evaluation import answers as scoring
from alpaca_cot.flags import check_fields, flag
from alpaca_cot.io import write_json_atomic, write_text_atomic
from alpaca_cot.prediction import PREDICTION_FIELD, PredictionRun

RUN_FILE = "run.json"
WRITER = "alpaca_cot evaluate.py"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TASK_DIR = os.path.join(ROOT, "configs", "lm_eval")
Z_95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


@dataclass
class EvaluateArgs:
    """evaluate.py: what to evaluate on, how to prompt, and where the results go."""

    data: list[str] = flag([], "unified-format files or dataset names to score by chain-of-thought exact match "
                               "(each evaluated on its own)")
    tasks: list[str] = flag([], "lm-evaluation-harness task names (commas between several)")
    output_dir: str | None = flag(None, "the folder for results.json, results.md and generations/")
    num_fewshot: int = flag(0, "worked examples before each question: other records of the same --data; for "
                               "--tasks, from the task's few-shot split (0: the task's own default)", min=0)
    max_samples: int | None = flag(None, "evaluate the first N records of each --data (the --limit of --tasks)",
                                   min=1)
    eval_batch_size: int = flag(8, "records generated (or scored) together", min=1)
    eval_loss: bool = flag(True, "also compute the reference answers' loss (one forward pass per record)")
    cutoff_len: int = flag(1024, "the longest sequence the eval loss reads, in tokens", min=8)
    include_path: str = flag(DEFAULT_TASK_DIR, "a folder of extra lm-eval task configs (YAML), e.g. offline "
                                               "tasks over local files")
    fewshot_seed: int = flag(0, "chooses each record's few-shot examples (and lm-eval's)", min=0, max=2**32 - 1)
    overwrite: bool = flag(False, "evaluate again instead of resuming")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.data and not self.tasks:
            raise UserError("Pass --data (files or dataset names to score by exact match) or --tasks "
                            "(lm-evaluation-harness tasks), or both.")
        if not self.output_dir:
            raise UserError("Pass --output_dir: the folder for results.json, results.md and the generations.")


# ---- answers ---------------------------------------------------------------------------------
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
# An option line: "- (A) text" (FLAN), "(A) text" (AQuA) or "- text" (ECQA).
_OPTION_LINE = re.compile(r"^[ \t]*(-[ \t]*)?(?:\(([A-Z])\)[ \t]*)?(\S.*?)[ \t]*$", re.MULTILINE)
_LABELLED = re.compile(r"^(\w+(?: \w+)?): \S")  # 'Sentence A: "He drinks milk."' is answered "Sentence A"
_LETTER_IN_TEXT = re.compile(r"\(([A-Z])\)")
# A reference that is the answer alone: one short line ("yes", "bloody mess", "Sentence A", "(D)").
_SHORT_ANSWER = 100


def final_answer(record: dict) -> tuple[str, str] | None:
    """``(kind, answer)`` a record's reference gives, kind being letter, number, yesno or text; None
    for a free-text reference (nothing to match exactly)."""
    split = split_cot(record) if "messages" not in record else None
    reference = scoring.reference_of(record)
    if split is not None:
        answer = split[2].strip().rstrip(".")
    elif reference is None:
        return None
    elif (found := scoring.reference_answer(reference)) is not None:
        answer = found[1]
    elif "\n" not in reference.strip() and len(reference.strip()) <= _SHORT_ANSWER:
        answer = reference.strip().rstrip(".")
    else:
        return None
    kind = classify(answer)
    return kind, normalize_answer(kind, answer)


def classify(answer: str) -> str:
    """The kind of a final answer: letter ("(B)", "B"), number, yesno or text."""
    text = answer.strip()
    if re.fullmatch(r"\(?[A-Z]\)?", text):
        return "letter"
    if text.lower() in ("yes", "no"):
        return "yesno"
    if scoring._parse_number(text) is not None and not re.search(r"[^\d\s,.$%-]", text):
        return "number"
    return "text"


def normalize_answer(kind: str, answer: str) -> str:
    """The answer as compared: a bare letter, a lower-case yes/no, else as written."""
    if kind == "letter":
        return answer.strip().strip("()")
    if kind == "yesno":
        return answer.strip().lower()
    return answer.strip()


def options_of(question: str) -> list[tuple[str | None, str]]:
    """The options a question lists, as (letter or None, text): ``- (A) text`` (FLAN), ``(A) text`` (AQuA) or,
    below an ``Options:`` line, ``- text`` (ECQA)."""
    head, marker, listed = question.rpartition("Options:")
    options = []
    for dash, letter, text in _OPTION_LINE.findall(listed if marker else question):
        if letter or (dash and marker):  # "- text" lines are options only below "Options:"
            label = _LABELLED.match(text)
            options.append((letter or None, label.group(1) if label and not letter else text))
    return options


def stated_answer(prediction: str, kind: str) -> str | None:
    """The answer a generation states the way the data phrases it (strict); None if it states none."""
    found = list(scoring._HASHES.finditer(prediction)) or list(scoring._PREDICTION_ANSWER.finditer(prediction))
    if found:
        answer = found[-1].group("answer").strip()
    elif classify(alone := prediction.strip().rstrip(".")) == kind and len(alone) <= _SHORT_ANSWER \
            and "\n" not in alone:
        answer = alone  # the answer alone: "yes", "(B)", "72", "bloody mess"
    else:
        return None
    if kind == "letter":
        return scoring.prediction_answer(answer, "letter")
    if kind == "yesno":
        word = _YES_NO.match(answer)
        return word.group(1).lower() if word else None
    if kind == "number":
        return scoring.prediction_answer(answer, "number")
    return answer.rstrip(".").strip()


def loose_answer(prediction: str, kind: str, options: list[tuple[str | None, str]]) -> str | None:
    """The answer found anywhere in a generation (flexible): the last number; the leading, else the
    last, yes/no; the last option letter "(B)"; else the option whose text comes last (its letter, or
    its text for options without letters); None when there is none."""
    if kind == "number":
        return scoring.prediction_answer(prediction, "number")
    if kind == "yesno":
        leading = _YES_NO.match(prediction.strip())
        words = _YES_NO.findall(prediction)
        return (leading.group(1) if leading else words[-1]).lower() if words else None
    if kind == "letter":
        letters = _LETTER_IN_TEXT.findall(prediction)
        if letters:
            return letters[-1]
    return _last_option(prediction, options)


def _last_option(prediction: str, options: list[tuple[str | None, str]]) -> str | None:
    text = f" {text_key(prediction)} "
    best, where = None, -1
    for letter, option in options:
        at = text.rfind(f" {text_key(option)} ")
        if at > where:
            best, where = letter or option, at
    return best


def score_generation(prediction: str, kind: str, answer: str, question: str = "") -> dict:
    """``{"extracted", "exact_match", "correct"}`` of one generation against the reference answer."""
    options = options_of(question)
    strict = stated_answer(prediction, kind)
    if kind == "letter" and strict is None:  # "the answer is sex" for option (D) sex
        stated = stated_answer(prediction, "text")
        named = [letter for letter, text in options if stated is not None
                 and text_key(text) == text_key(stated)]
        strict = named[0] if len(named) == 1 else None
    if _same(kind, answer, strict):
        return {"extracted": strict, "exact_match": True, "correct": True}
    if kind == "text" and not options:
        # free text: right when the reference answer appears in the generation as a phrase
        phrase = text_key(answer)
        found = bool(phrase) and f" {phrase} " in f" {text_key(prediction)} "
        return {"extracted": strict, "exact_match": False, "correct": found}
    loose = loose_answer(prediction, kind, options)
    return {"extracted": loose if loose is not None else strict, "exact_match": False,
            "correct": _same(kind, answer, loose)}


def _same(kind: str, reference: str, predicted: str | None) -> bool:
    if predicted is None:
        return False
    if kind == "yesno":
        return predicted.lower() == reference.lower()
    if kind == "text":
        return text_key(predicted) == text_key(reference)
    return scoring.answers_match(kind, reference, predicted)


def text_key(text: str) -> str:
    """A text answer as compared: lower case, no punctuation, single spaces, no leading article.
    Articles stay inside ("Sentence A" and "Sentence B" differ)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(words[1:] if len(words) > 1 and words[0] in ("a", "an", "the") else words)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, trials: int) -> dict:
    """A proportion with its Wilson 95% interval."""
    low, high = wilson_interval(successes, trials)
    return {"value": successes / trials if trials else None, "correct": successes, "records": trials,
            "ci95": [low, high]}


# ---- prompts ---------------------------------------------------------------------------------
def question_of(record: dict) -> str:
    """What a record asks: its instruction (and input), or the text of its last user turn."""
    if "messages" in record:
        users = [turn["content"] for turn in record["messages"] if turn["role"] == "user"]
        return users[-1] if users else ""
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


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


# ---- the output folder -----------------------------------------------------------------------
def data_name(source: str) -> str:
    """A short name for a ``--data`` entry: the registry name, else the file or folder name."""
    if source in load_registry() and not os.path.exists(source):
        return source
    return os.path.splitext(os.path.basename(os.path.normpath(source)))[0] or "data"


def prepare_output_dir(output_dir: str, settings: dict, overwrite: bool) -> None:
    """Claim ``output_dir`` for this evaluation: new, or an earlier evaluate.py run with the same settings.

    Raises UserError for a file, for a folder evaluate.py did not write (nothing in it is touched),
    and for an earlier run with other settings unless ``overwrite`` (which clears what it wrote).
    """
    marker = os.path.join(output_dir, RUN_FILE)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is an existing file; pass a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        saved = _read_json(marker)
        if saved.get("written_by") != WRITER:
            raise UserError(f"--output_dir {output_dir} holds files evaluate.py did not write (no {marker} of "
                            "its own); choose a new folder")
        if saved.get("settings") != settings:
            if not overwrite:
                changed = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                                 if settings.get(k) != saved.get("settings", {}).get(k))
                raise UserError(f"--output_dir {output_dir} holds an evaluation with other settings "
                                f"({', '.join(changed)}); pass --overwrite to replace it, or another --output_dir")
        if overwrite:
            for name in ("generations", "lm_eval"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            for name in ("results.json", "results.md"):
                if os.path.isfile(os.path.join(output_dir, name)):
                    os.remove(os.path.join(output_dir, name))
    write_json_atomic(marker, {"written_by": WRITER, "settings": settings})


def file_stamps(paths: list[str]) -> dict[str, list[int]]:
    """Size and modification time of each file: a retrained adapter in the same --lora_dir, or an edited
    --data file, is other settings, so generations are never resumed from what was there before."""
    return {os.path.abspath(path): [os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in sorted(paths)}


def _folder_files(folder: str | None) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- the built-in CoT evaluation ---------------------------------------------------------------
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

    records = [r for path in resolve_data([source]) for r in read_records(path)]
    count = min(len(records), args.max_samples or len(records))
    name = data_name(source)
    items = build_items(records, count, args.num_fewshot, args.fewshot_seed)
    folder = os.path.join(args.output_dir, "generations")
    os.makedirs(folder, exist_ok=True)
    run = PredictionRun(items, os.path.join(folder, f"{name}.jsonl"), sources=[source])
    start = time.perf_counter()
    if run.todo:
        print(f"{name}: {count - len(run.todo)} of {count} records already generated; generating {len(run.todo)}",
              flush=True)
        run.predict(Generator(*model.get()), sampling, args.eval_batch_size)
    generated = run.finish()
    rows, exact, correct, unscored = [], 0, 0, 0
    for item, record in zip(generated, records[:count], strict=True):
        final = final_answer(record)
        prompt = {k: v for k, v in item.items() if k not in ("index", PREDICTION_FIELD)}
        row = {"index": item["index"], "prompt": prompt, "generation": item[PREDICTION_FIELD],
               "reference": scoring.reference_of(record)}
        if final is None:
            unscored += 1
            row.update(kind=None, answer=None, extracted=None, exact_match=None, correct=None)
        else:
            kind, answer = final
            scored = score_generation(item[PREDICTION_FIELD], kind, answer, question_of(record))
            exact += scored["exact_match"]
            correct += scored["correct"]
            row.update(kind=kind, answer=answer, **scored)
        rows.append(row)
    write_text_atomic(os.path.join(folder, f"{name}.scored.jsonl"),
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    scored_count = count - unscored
    result = {"data": source, "records": count, "scored": scored_count, "without_final_answer": unscored,
              "num_fewshot": args.num_fewshot, "accuracy": proportion(correct, scored_count),
              "exact_match": proportion(exact, scored_count),
              "kinds": {kind: sum(r["kind"] == kind for r in rows) for kind in ("letter", "number", "yesno", "text")},
              "generations": os.path.join("generations", f"{name}.scored.jsonl")}
    if args.eval_loss:
        loss_path = os.path.join(folder, f"{name}.loss.json")
        saved = _read_json(loss_path)
        if "eval_loss" not in saved:
            saved = {"eval_loss": answer_loss(*model.get(), records[:count], args.cutoff_len,
                                              args.eval_batch_size)}
            write_json_atomic(loss_path, saved)
        result["eval_loss"] = saved["eval_loss"]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


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


# ---- lm-evaluation-harness -------------------------------------------------------------------
def lm_eval_model_args(loader_kwargs: dict) -> dict:
    """lm-eval's HF model arguments for our ``ModelArgs``: ``pretrained=BASE,peft=ADAPTER,dtype=...``."""
    from alpaca_cot.models.loading import (
        ADAPTER_CONFIG,
        check_model_folder,
        resolve_base_model,
        resolve_dtype,
        resolve_lora_dir,
    )
    from alpaca_cot.models.registry import default_checkpoint

    lora_dir = loader_kwargs.get("lora_dir")
    folder = resolve_lora_dir(lora_dir) if lora_dir else None
    args: dict[str, Any] = {}
    if folder and os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        args["pretrained"] = resolve_base_model(folder, loader_kwargs.get("model_name_or_path"))
        args["peft"] = folder
    elif folder:
        check_model_folder(folder)
        args["pretrained"] = folder
    elif loader_kwargs.get("model_name_or_path"):
        args["pretrained"] = loader_kwargs["model_name_or_path"]
    elif loader_kwargs.get("model_type"):
        args["pretrained"] = default_checkpoint(loader_kwargs["model_type"], loader_kwargs.get("size"))
    else:
        raise UserError("Pass --lora_dir (a run's output folder, a PEFT adapter folder or hub id) or "
                        "--model_name_or_path (a base model).")
    dtype, note = resolve_dtype(loader_kwargs.get("compute_dtype"))
    if note:
        print(note)
    args["dtype"] = str(dtype).removeprefix("torch.")
    if loader_kwargs.get("trust_remote_code"):
        args["trust_remote_code"] = True
    return args


def run_lm_eval(loader_kwargs: dict, model: LazyModel, args: EvaluateArgs) -> dict:
    """Run ``--tasks`` through lm-evaluation-harness's HF model; its results, per-sample logs saved."""
    import torch

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install lm_eval") from None
    if args.include_path and not os.path.isdir(args.include_path):
        raise UserError(f"--include_path {args.include_path} is not a folder of task configs")
    manager = TaskManager(include_path=args.include_path or None)
    unknown = [task for task in args.tasks if not manager.match_tasks([task])]
    if unknown:
        raise UserError(f"--tasks: unknown lm-eval task {', '.join(unknown)}; list them with `lm_eval ls tasks`"
                        f" (offline tasks: a YAML in --include_path, now {args.include_path})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(loader_kwargs)
    if loader_kwargs.get("quantization_bit"):
        # lm-eval quantizes through from_pretrained(load_in_4bit=...), which transformers 5 removed:
        # hand it our loader's quantized model (with the adapter) instead.
        loaded, tokenizer, _ = model.get()
        lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=args.eval_batch_size, device=device)
        described = {**model_args, "quantization_bit": loader_kwargs["quantization_bit"]}
    else:
        lm = HFLM(**model_args, batch_size=args.eval_batch_size, device=device)
        described = model_args
    output = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot or None,
                                     limit=args.max_samples, task_manager=manager, log_samples=True,
                                     random_seed=args.fewshot_seed, numpy_random_seed=args.fewshot_seed,
                                     torch_random_seed=args.fewshot_seed, fewshot_random_seed=args.fewshot_seed)
    folder = os.path.join(args.output_dir, "lm_eval")
    for task, samples in (output.get("samples") or {}).items():
        write_text_atomic(os.path.join(folder, f"{task}.samples.jsonl"),
                          "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples))
    model_arg_text = ",".join(f"{k}={v}" for k, v in described.items())
    return {"model_args": model_arg_text, "tasks": args.tasks, "num_fewshot": args.num_fewshot,
            "limit": args.max_samples, "results": _plain(output["results"]),
            "n_samples": _plain(output.get("n-samples", {})), "lm_eval_version": lm_eval.__version__,
            "samples": os.path.join("lm_eval", "TASK.samples.jsonl")}


def _plain(value: Any) -> Any:
    """JSON-ready: numbers as floats (NaN as None), everything else as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# ---- the report ------------------------------------------------------------------------------
def _percent(p: dict) -> str:
    if p["value"] is None:
        return "n/a"
    low, high = p["ci95"]
    return f"{100 * p['value']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def render_table(results: dict) -> str:
    """The results as Markdown: one row per --data set, then one per lm-eval task metric."""
    lines = []
    if results.get("data"):
        lines += ["| data | records | accuracy [95% CI] | exact match [95% CI] | eval loss |",
                  "|---|---|---|---|---|"]
        for name, r in results["data"].items():
            loss = f"{r['eval_loss']:.3f}" if isinstance(r.get("eval_loss"), float) else "n/a"
            lines.append(f"| {name} | {r['scored']} | {_percent(r['accuracy'])} | {_percent(r['exact_match'])} "
                         f"| {loss} |")
    if results.get("lm_eval"):
        if lines:
            lines.append("")
        lines += ["| lm-eval task | metric | value | stderr |", "|---|---|---|---|"]
        for task, metrics in results["lm_eval"]["results"].items():
            for key, value in metrics.items():
                metric, comma, filt = key.partition(",")  # lm-eval keys are "metric,filter"
                if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                shown_err = f"{stderr:.4f}" if isinstance(stderr, float) else "n/a"
                lines.append(f"| {task} | {metric}{f' ({filt})' if filt and filt != 'none' else ''} "
                             f"| {value:.4f} | {shown_err} |")
    return "\n".join(lines) + "\n"


def run_evaluation(model_args: Any, sampling: Any, args: EvaluateArgs) -> dict:
    """Evaluate as ``args`` say; writes results.json and results.md and returns the results."""
    loader_kwargs = model_args.loader_kwargs()
    data_files = resolve_data(args.data) if args.data else []  # a bad name fails before anything is written
    settings = {"model": loader_kwargs, "model_files": file_stamps(_folder_files(loader_kwargs.get("lora_dir"))),
                "data_files": file_stamps(data_files), "sampling": asdict(sampling),
                **{k: v for k, v in asdict(args).items() if k not in ("output_dir", "overwrite")}}
    names = [data_name(source) for source in args.data]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"--data: two entries are both named {duplicated[0]!r}; give them different file names")
    prepare_output_dir(args.output_dir, settings, args.overwrite)
    model = LazyModel(loader_kwargs)
    results: dict[str, Any] = {"model": loader_kwargs, "sampling": asdict(sampling), "data": {}}
    for source, name in zip(args.data, names, strict=True):
        results["data"][name] = evaluate_data(source, model, sampling, args)
    if args.tasks:
        results["lm_eval"] = run_lm_eval(loader_kwargs, model, args)
    write_json_atomic(os.path.join(args.output_dir, "results.json"), _plain(results))
    write_text_atomic(os.path.join(args.output_dir, "results.md"), render_table(results))
    return results
