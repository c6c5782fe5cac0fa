"""The preference stage (--stage dpo|orpo|simpo|kto) on the tiny Llama: every stage trains and saves an adapter
plain peft loads; TRL's DPO loss equals the formula from summed log-probabilities; the prompt carries no loss;
records of the wrong kind are one line; truncation follows the SFT rules; continuing an SFT adapter, resume,
precomputed reference log-probabilities and DDP."""

from __future__ import annotations

import json
import math
import os
import shutil

import datasets
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data.encoding import encode_records
from alpaca_cot.data.pairs import encode_kto, encode_pair, with_answer
from alpaca_cot.data.records import DataError
from alpaca_cot.data.templates import get_template
from alpaca_cot.errors import UserError
from alpaca_cot.models.loading import load_tokenizer
from alpaca_cot.models.registry import get_model_spec
from alpaca_cot.training.preference import run_preference, trainer_class
from alpaca_cot.training.run import run_finetune
from alpaca_cot.training.trainer import RunTotals
from data.converters import convert_file
from tests.conftest import run_script, shared_path
from tests.fixtures.synthetic import synthetic_records
from tests.test_ddp import assert_trained, finetune, max_weight_diff

STAGES = ("dpo", "orpo", "simpo", "kto")


def _pairs(n: int) -> list[dict]:
    """Pairs from the synthetic records: the record's answer is chosen, another record's answer rejected."""
    records = [r for r in synthetic_records(n + 20) if "output" in r]
    out = []
    for i, r in enumerate(records):
        rejected = records[(i + 7) % len(records)]["output"]
        if rejected.strip() != r["output"].strip():
            out.append({"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
                        "rejected": rejected})
    return out[:n]


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", _pairs(60))


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory) -> str:
    rows = [{"instruction": p["instruction"], "input": p["input"], "output": p["chosen" if i % 2 else "rejected"],
             "label": bool(i % 2)} for i, p in enumerate(_pairs(60))]
    return _write(tmp_path_factory.mktemp("kto") / "kto.jsonl", rows)


def _args(model_dir: str, data: str, out, **kw) -> FinetuneArgs:
    base = {"model_type": "llama", "model_name_or_path": model_dir, "data": [data], "output_dir": str(out),
            "compute_dtype": "fp32", "max_steps": 3, "per_gpu_train_batch_size": 4, "val_set_size": 0,
            "lora_target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "cutoff_len": 96,
            "learning_rate": 1e-2, "template": "alpaca"}
    return FinetuneArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: str):
    return load_tokenizer(tiny_model_dir, get_model_spec("llama"))


# ---- (a) every stage trains and writes what an SFT run writes -------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_and_saves_an_adapter_plain_peft_loads(tmp_path, tiny_model_dir: str, pair_file: str,
                                                                 kto_file: str, stage: str) -> None:
    out = tmp_path / stage
    metrics, model = run_preference(_args(tiny_model_dir, kto_file if stage == "kto" else pair_file, out,
                                          stage=stage, val_set_size=8, cutoff_len=32))
    assert metrics["steps"] == 3 and metrics["stage"] == stage and math.isfinite(metrics["train_loss"])
    assert metrics["effective_tokens"] > 0 and "eval_loss_after" in metrics
    for name in ("adapter_model.safetensors", "finetune_args.json", "metrics.json", "loss_curve.png",
                 "template.json", "truncated_records.jsonl"):  # cutoff 32 cuts some records
        assert (out / name).is_file(), name
    saved = FinetuneArgs.load(str(out))
    assert saved.stage == stage and saved.pref_loss == {"dpo": "sigmoid", "orpo": None, "simpo": "simpo",
                                                        "kto": "kto"}[stage]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-4  # trained from zero
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = peft.PeftModel.from_pretrained(base, str(out))
    trained = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, trained[name]), name
    entries = [json.loads(line) for line in open(out / "truncated_records.jsonl", encoding="utf-8")]
    assert entries and {e["action"] for e in entries} <= {"cut", "left out"} and entries[0]["file"]


# ---- (b), (c) TRL's DPO loss against the formula, and the prompt's share of it ---------------------------------
def _dpo_trainer(tmp_path, model_dir: str, tokenizer, rows: list[dict], beta: float):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # A random B: the policy differs from the reference (the base, adapter disabled), so the margins are not 0.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           task_type="CAUSAL_LM")
    from trl import DPOConfig

    config = DPOConfig(output_dir=str(tmp_path), beta=beta, max_length=None, per_device_train_batch_size=len(rows),
                       report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False)
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                          for r in rows])
    return trainer_class("dpo")(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                peft_config=lora, callbacks=[RunTotals()])


def _summed_logp(model, ids: list[int], start: int) -> torch.Tensor:
    """The sum of log p(token | tokens before) over ``ids[start:]``, from one plain forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[start - 1:].sum()


def test_dpo_loss_equals_the_formula_from_summed_reply_logps(tmp_path, tiny_model_dir: str, tokenizer) -> None:
    template = get_template("alpaca", tokenizer)
    rows = [encode_pair(p, template, tokenizer, 96) for p in _pairs(4)]
    beta = 0.3
    trainer = _dpo_trainer(tmp_path, tiny_model_dir, tokenizer, rows, beta)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model = trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, batch))
        logps = {}
        for reference in (False, True):
            with model.disable_adapter() if reference else torch.no_grad():
                for side in ("chosen", "rejected"):
                    logps[reference, side] = torch.stack([
                        _summed_logp(model, r["prompt_ids"] + r[f"{side}_ids"], len(r["prompt_ids"])) for r in rows])
    margin = (logps[False, "chosen"] - logps[True, "chosen"]) - (logps[False, "rejected"] - logps[True, "rejected"])
    by_hand = float(-torch.nn.functional.logsigmoid(beta * margin).mean())
    assert margin.abs().min() > 1e-3  # the policy is not the reference: the formula has something to check
    assert abs(trl_loss - by_hand) < 1e-5, (trl_loss, by_hand)


def test_prompt_tokens_carry_no_loss(tmp_path, tiny_model_dir: str, tokenizer) -> None:
    template = get_template("alpaca", tokenizer)
    rows = [encode_pair(p, template, tokenizer, 96) for p in _pairs(3)]
    trainer = _dpo_trainer(tmp_path, tiny_model_dir, tokenizer, rows, 0.1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    # TRL's batch: chosen rows then rejected rows, our ids, the loss mask over the reply tokens only.
    for j, side in enumerate(("chosen", "rejected")):
        for i, row in enumerate(rows):
            ids, mask = batch["input_ids"][j * len(rows) + i].tolist(), batch["completion_mask"][j * len(rows) + i]
            n, m = len(row["prompt_ids"]), len(row[f"{side}_ids"])
            assert ids[:n + m] == row["prompt_ids"] + row[f"{side}_ids"]
            assert mask.tolist() == [0] * n + [1] * m + [0] * (len(ids) - n - m)
    # The mask decides: one prompt position more in it (the marker before the reply) changes TRL's loss, which
    # test_dpo_loss_equals_the_formula_from_summed_reply_logps matches with the reply tokens alone.
    model = trainer.model.eval()
    widened = {**batch, "completion_mask": batch["completion_mask"].clone()}
    for k, row in enumerate(rows + rows):
        widened["completion_mask"][k, len(row["prompt_ids"]) - 1] = 1
    with torch.no_grad():
        assert abs(float(trainer.compute_loss(model, batch)) - float(trainer.compute_loss(model, widened))) > 1e-6
    # CPO and ORPO take labels: -100 over the prompt, the reply's ids after it.
    cpo = trainer_class("simpo").tokenize_row(None, {k: rows[0][k] for k in ("prompt_ids", "chosen_ids",
                                                                              "rejected_ids")})
    n = len(rows[0]["prompt_ids"])
    assert cpo["chosen_labels"] == [-100] * n + rows[0]["chosen_ids"]
    assert cpo["rejected_input_ids"] == rows[0]["prompt_ids"] + rows[0]["rejected_ids"]


# ---- (d) records of the wrong kind ------------------------------------------------------------------------------
def test_wrong_kind_of_records_is_one_line(tmp_path, tiny_model_dir: str, pair_file: str, kto_file: str,
                                           tiny_data_file: str) -> None:
    cases = [("dpo", tiny_data_file, "an SFT record", "--stage dpo trains on preference pairs"),
             ("kto", pair_file, "a preference pair", "--stage kto trains on KTO records"),
             ("orpo", kto_file, "a KTO record", "--stage orpo trains on preference pairs")]
    for stage, data, found, hint in cases:
        with pytest.raises(DataError) as caught:
            run_preference(_args(tiny_model_dir, data, tmp_path / stage, stage=stage))
        message = str(caught.value)
        assert "\n" not in message and found in message and message.endswith(hint)
        assert message.startswith(f"{data}: record 0") or message.startswith(f"{data}:1:")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: a preference pair .* where an SFT record .* was "
                                        r"expected; --stage dpo, orpo or simpo trains on pairs"):
        run_finetune(_args(tiny_model_dir, pair_file, tmp_path / "sft"))
    assert not os.path.exists(tmp_path / "sft") and not os.path.exists(tmp_path / "dpo")


def test_flags_are_checked_with_their_valid_choices(tiny_model_dir: str, pair_file: str, tmp_path) -> None:
    with pytest.raises(UserError, match="--pref_loss 'simpo' is not a loss of --stage dpo; valid choices: sigmoid, "
                                        "hinge, ipo"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="dpo", pref_loss="simpo")
    with pytest.raises(UserError, match="ORPO has one loss"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="orpo", pref_loss="sigmoid")
    with pytest.raises(UserError, match="--stage simpo has no reference model"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="simpo", precompute_ref_logps=True)
    with pytest.raises(UserError, match="--lora_dir applies to a preference stage"):
        _args(tiny_model_dir, pair_file, tmp_path, lora_dir=str(tmp_path))
    with pytest.raises(UserError, match="--stage dpo trains --peft_type lora or full"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="dpo", peft_type="prefix")
    with pytest.raises(UserError, match="--stage kto with its KL term needs --per_gpu_train_batch_size of at least 2"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="kto", per_gpu_train_batch_size=1)
    with pytest.raises(UserError, match="--train_on_inputs applies to --stage sft only"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="orpo", train_on_inputs=True)
    with pytest.raises(UserError, match="--pref_beta"):
        _args(tiny_model_dir, pair_file, tmp_path, stage="dpo", pref_beta=0)


def test_command_line_refusal_and_help(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    proc = run_script("uniform_finetune.py", "--model_name_or_path", tiny_model_dir, "--data", tiny_data_file,
                      "--stage", "dpo", "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "where a preference pair ('chosen' and 'rejected' replies) was expected" in proc.stderr
    proc = run_script("uniform_finetune.py", "--help")
    help_text = proc.stdout + proc.stderr
    for name in ("--stage", "--pref_beta", "--pref_loss", "--precompute_ref_logps", "--lora_dir"):
        assert name in help_text, name


# ---- (e) truncation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template_name", ["alpaca", "chat"])
def test_a_pair_is_its_sft_encodings_split_at_the_last_answer(tokenizer, template_name: str) -> None:
    template = get_template(template_name, tokenizer)
    multi = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "and then?"}], "chosen": "we talk", "rejected": "bye"}
    for pair in (_pairs(1)[0], multi):
        encoded = encode_pair(pair, template, tokenizer, 4096)
        assert not encoded["truncated"]
        for side in ("chosen", "rejected"):
            sft = encode_records([with_answer(pair, pair[side])], template, tokenizer, 4096)[0]
            ids = encoded["prompt_ids"] + encoded[f"{side}_ids"]
            assert sft.input_ids[:len(ids)] == ids
            end = tokenizer.eos_token_id if template.appends_eos else tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert encoded[f"{side}_ids"][-1] == end
    kto = encode_kto({**_pairs(1)[0], "output": "fine", "label": False}, template, tokenizer, 4096)
    assert kto["label"] is False and kto["prompt_ids"] == encode_pair(_pairs(1)[0], template, tokenizer,
                                                                      4096)["prompt_ids"]


def test_truncation_cuts_the_prompt_once_and_a_cut_reply_has_no_eos(tokenizer) -> None:
    template = get_template("alpaca", tokenizer)
    pair = {"instruction": "word " * 60, "input": "", "chosen": "long answer " * 40, "rejected": "short"}
    whole = encode_pair(pair, template, tokenizer, 4096)
    cut = encode_pair(pair, template, tokenizer, 64)
    assert cut["truncated"] and not whole["truncated"]
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) <= 64
    assert len(cut["prompt_ids"]) + len(cut["rejected_ids"]) <= 64
    prompt, kept = whole["prompt_ids"], cut["prompt_ids"]
    head = (len(kept) + 1) // 2  # the prompt keeps its start (BOS) and its end (the marker before the answer)
    assert kept == prompt[:head] + prompt[len(prompt) - (len(kept) - head):] and len(kept) < len(prompt)
    assert cut["chosen_ids"] == whole["chosen_ids"][:len(cut["chosen_ids"])]
    assert cut["chosen_ids"][-1] != tokenizer.eos_token_id  # cut: the model never learns to stop mid-answer
    assert cut["rejected_ids"] == whole["rejected_ids"] and cut["rejected_ids"][-1] == tokenizer.eos_token_id


# ---- continuing an SFT adapter, resume, precomputed reference, DDP ---------------------------------------------
@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir: str, tiny_data_file: str) -> str:
    out = tmp_path_factory.mktemp("sft") / "run"
    run_finetune(_args(tiny_model_dir, tiny_data_file, out, max_steps=4, per_gpu_train_batch_size=8))
    return str(out)


def test_dpo_continues_an_sft_adapter_which_is_its_reference(tmp_path, sft_adapter: str, pair_file: str) -> None:
    args = _args(None, pair_file, tmp_path / "out", stage="dpo", lora_dir=sft_adapter, val_set_size=8,
                 template=None)
    assert args.model_name_or_path == FinetuneArgs.load(sft_adapter).model_name_or_path  # the adapter's base
    metrics, _ = run_preference(args)
    # Before training the policy is the SFT adapter and so is the reference: every margin is 0, the loss log 2.
    assert abs(metrics["eval_loss_before"] - math.log(2)) < 1e-6
    assert metrics["template"] == "alpaca" and metrics["reference"].startswith("the --lora_dir adapter")
    start, end = load_file(os.path.join(sft_adapter, "adapter_model.safetensors")), \
        load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    assert not (tmp_path / "out" / "ref").exists()  # TRL's frozen copy is not part of the output
    # The SFT adapter moved the model away from the base: a reference of the base would not give log 2.
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    base_logits = base(input_ids=ids).logits
    tuned = peft.PeftModel.from_pretrained(base, sft_adapter)(input_ids=ids).logits
    assert (tuned - base_logits).abs().max() > 1e-3


def test_resume_equals_the_uninterrupted_run(tmp_path, sft_adapter: str, pair_file: str, monkeypatch) -> None:
    kw = {"stage": "dpo", "lora_dir": sft_adapter, "max_steps": 4, "save_steps": 2, "template": None}
    whole, _ = run_preference(_args(None, pair_file, tmp_path / "whole", **kw))
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    for name in os.listdir(tmp_path / "killed"):  # killed after checkpoint-2: the marker and that checkpoint
        if name not in ("checkpoint-2", "run.json"):
            path = tmp_path / "killed" / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    steps: list[int] = []
    original = RunTotals.on_step_end

    def on_step_end(self, args, state, control, **kwargs) -> None:  # counts the steps the resumed run trains
        steps.append(state.global_step)
        original(self, args, state, control, **kwargs)

    monkeypatch.setattr(RunTotals, "on_step_end", on_step_end)
    resumed, _ = run_preference(_args(None, pair_file, tmp_path / "killed", resume_from_checkpoint=True, **kw))
    assert steps == [3, 4]
    a, b = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    for key in ("train_loss", "effective_tokens", "steps"):
        assert resumed[key] == whole[key], key


def test_precomputed_reference_logps_train_the_same_adapter(tmp_path, tiny_model_dir: str, pair_file: str,
                                                             monkeypatch) -> None:
    calls: list[str] = []
    from trl import DPOTrainer

    original = DPOTrainer._precompute_ref_logps
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps",
                        lambda self, dataset, name, batch_size: (calls.append(name),
                                                                 original(self, dataset, name, batch_size))[1])
    runs = {}
    for precompute in (False, True):
        out = tmp_path / str(precompute)
        runs[precompute], _ = run_preference(_args(tiny_model_dir, pair_file, out, stage="dpo",
                                                   precompute_ref_logps=precompute))
    assert calls == ["train"]  # once, before training
    assert abs(runs[True]["train_loss"] - runs[False]["train_loss"]) < 1e-5
    assert max_weight_diff(str(tmp_path / "False"), str(tmp_path / "True")) < 1e-5


@pytest.mark.slow
def test_two_process_dpo_equals_one_process_on_the_same_global_batch(tmp_path, tiny_model_dir: str,
                                                                    pair_file: str) -> None:
    flags = ["--model_type", "llama", "--model_name_or_path", tiny_model_dir, "--data", pair_file, "--stage", "dpo",
             "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0", "--val_set_size", "0",
             "--max_steps", "3", "--learning_rate", "1e-2", "--compute_dtype", "fp32", "--template", "alpaca",
             "--cutoff_len", "96"]
    finetune(str(tmp_path / "one"), *flags, "--per_gpu_train_batch_size", "4")
    finetune(str(tmp_path / "two"), *flags, "--per_gpu_train_batch_size", "2", processes=2)
    assert json.load(open(tmp_path / "two" / "metrics.json"))["world_size"] == 2
    assert_trained(str(tmp_path / "one"))
    assert max_weight_diff(str(tmp_path / "one"), str(tmp_path / "two")) < 1e-5


def test_qlora_dpo_trains_its_adapter(tmp_path, tiny_model_dir: str, pair_file: str) -> None:
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    metrics, _ = run_preference(_args(tiny_model_dir, pair_file, tmp_path / "out", stage="dpo", quantization_bit=4))
    assert metrics["steps"] == 3
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-4


@pytest.mark.slow
def test_deepspeed_dpo_on_cpu_equals_the_plain_run(tmp_path, tiny_model_dir: str, pair_file: str) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    flags = ["--model_type", "llama", "--model_name_or_path", tiny_model_dir, "--data", pair_file, "--stage", "dpo",
             "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0", "--val_set_size", "0",
             "--max_steps", "3", "--learning_rate", "1e-2", "--compute_dtype", "fp32", "--template", "alpaca",
             "--cutoff_len", "64", "--per_gpu_train_batch_size", "4"]
    finetune(str(tmp_path / "plain"), *flags)
    finetune(str(tmp_path / "zero2"), *flags, "--deepspeed", "zero2", processes=1)
    assert json.load(open(tmp_path / "zero2" / "metrics.json"))["engine"] == "deepspeed"
    assert_trained(str(tmp_path / "plain"))
    assert max_weight_diff(str(tmp_path / "plain"), str(tmp_path / "zero2")) < 1e-5


def test_dpo_on_real_hh_rlhf_pairs(tmp_path, tiny_model_dir: str, tokenizer) -> None:
    records, _ = convert_file(shared_path("data", "raw", "hh_rlhf", "harmless-base", "test.jsonl.gz"))
    data = _write(tmp_path / "hh.jsonl", records[:40])
    template = get_template("chat", tokenizer)
    first = encode_pair(records[0], template, tokenizer, 4096)  # a conversation: its earlier answers are prompt
    sft = encode_records([with_answer(records[0], records[0]["chosen"])], template, tokenizer, 4096)[0]
    assert sft.input_ids[:len(first["prompt_ids"]) + len(first["chosen_ids"])] == first["prompt_ids"] + \
        first["chosen_ids"]
    assert records[0]["messages"][1]["content"][:20] in tokenizer.decode(first["prompt_ids"])
    metrics, _ = run_preference(_args(tiny_model_dir, data, tmp_path / "out", stage="dpo", template="chat",
                                      cutoff_len=128, max_steps=2))
    assert metrics["steps"] == 2 and metrics["train_records"] == 40 and math.isfinite(metrics["train_loss"])
    cut = [json.loads(line) for line in open(tmp_path / "out" / "truncated_records.jsonl", encoding="utf-8")]
    assert cut and all(e["tokens"] > 128 >= e["kept_tokens"] for e in cut if e["action"] == "cut")
