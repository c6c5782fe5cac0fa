"""uniform_finetune.py end to end on the real stories260K model and real Alpaca rows."""

from __future__ import annotations

import json
import os
import shlex

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from alpaca_cot.cli import normalize_argv
from alpaca_cot.config import FinetuneArgs
from alpaca_cot.loading import resolve_dtype
from alpaca_cot.training import run_finetune
from tests.conftest import run_script

SEED_COMMANDS = [
    "--model_type llama --model_name_or_path PATH --data alpaca-belle-cot --lora_target_modules q_proj v_proj "
    "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1",
    "--model_type chatglm --model_name_or_path PATH --data alpaca-belle-cot --lora_target_modules query_key_value "
    "--lora_r 32 --lora_alpha 32 --lora_dropout 0.1 --per_gpu_train_batch_size 2 --learning_rate 2e-5 --epochs 1",
    "--model_type bloom --model_name_or_path PATH --data alpaca-belle-cot --lora_target_modules query_key_value "
    "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1",
    "--local-rank=1 --model_type llama --data a.json b.jsonl",
    "--local_rank 0 --model_type llama --resume_from_checkpoint",
]


def test_seed_argv_becomes_fire_argv(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "")  # registers it for restoring after the test
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argvs = [normalize_argv(shlex.split(c)) for c in SEED_COMMANDS]
    assert "--lora_target_modules=q_proj,v_proj" in argvs[0]
    assert "--lora_target_modules=query_key_value" in argvs[1] and "--lora_r" in argvs[1]
    assert argvs[3] == ["--model_type", "llama", "--data=a.json,b.jsonl"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert argvs[4] == ["--model_type", "llama", "--resume_from_checkpoint"]


def test_main_run_learns_and_saves_everything(trained_adapter: str) -> None:
    metrics = json.load(open(os.path.join(trained_adapter, "metrics.json")))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.05
    assert metrics["effective_tokens_per_s"] > 0 and metrics["matmul_peak_gflops"] > 1
    assert 0 < metrics["mfu"] < 1.5 and metrics["flops_per_token"] > 4 * 200_000
    # Packing is on by default: no padding, and one optimizer step per batch of 8 records.
    assert metrics["packing"] is True and metrics["padding_fraction"] == 0
    assert metrics["steps"] == -(-metrics["train_records"] // 8)
    for name in ("adapter_config.json", "tokenizer.json", "finetune_args.json", "template.json", "loss_curve.png"):
        assert os.path.isfile(os.path.join(trained_adapter, name)), name
    with open(os.path.join(trained_adapter, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(trained_adapter, "finetune_args.json")))
    assert saved["lora_target_modules"] == ["q_proj", "v_proj"] and saved["model_type"] == "llama"


def test_adapter_is_not_the_seeds_empty_443_bytes(trained_adapter: str) -> None:
    # The seed's state_dict monkeypatch saved 443-byte adapters holding no weights.
    path = os.path.join(trained_adapter, "adapter_model.safetensors")
    weights = load_file(path)
    # stories260K: 5 layers x (q_proj, v_proj) x (A, B)
    assert len(weights) == 20
    assert os.path.getsize(path) > sum(t.numel() * t.element_size() for t in weights.values()) > 443
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def _args(stories_dir: str, data: str, out, **kw) -> FinetuneArgs:
    base = {"model_type": "llama", "model_name_or_path": stories_dir, "data": [data], "val_set_size": 0,
            "max_steps": 3, "per_gpu_train_batch_size": 4, "learning_rate": 1e-2, "output_dir": str(out),
            "compute_dtype": "fp32", "logging_steps": 1}
    return FinetuneArgs(**{**base, **kw})


def test_reloaded_adapter_reproduces_trained_logits(tmp_path, stories_dir: str, alpaca_file: str) -> None:
    _, model = run_finetune(_args(stories_dir, alpaca_file, tmp_path / "out"))
    probe = torch.tensor([[1, 410, 38, 306, 414, 263, 304, 341, 13]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(stories_dir)
        base_logits = base(input_ids=probe).logits
        reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()(input_ids=probe).logits
    assert not torch.equal(trained, base_logits)
    assert torch.equal(trained, reloaded)


@pytest.mark.parametrize("extra", [{"peft_type": "adalora", "adalora_tinit": 0, "adalora_tfinal": 1,
                                    "adalora_delta_t": 1}, {"peft_type": "prompt"}, {"peft_type": "p_tuning"},
                                   {"peft_type": "prefix"}, {"peft_type": "full"}, {"use_dora": True},
                                   {"use_rslora": True}, {"lora_target_modules": ["all"]}],
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items())[:40])
def test_every_peft_method_trains(tmp_path, stories_dir: str, alpaca_file: str, extra: dict) -> None:
    metrics, model = run_finetune(_args(stories_dir, alpaca_file, tmp_path / "out", **extra))
    assert metrics["steps"] == 3 and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    names = os.listdir(tmp_path / "out")
    assert ("model.safetensors" if extra.get("peft_type") == "full" else "adapter_model.safetensors") in names


def test_resume_and_output_dir_protection(tmp_path, stories_dir: str, alpaca_file: str) -> None:
    out = tmp_path / "out"
    common = ["--model_type", "llama", "--model_name_or_path", stories_dir, "--data", alpaca_file,
              "--val_set_size", "0", "--per_gpu_train_batch_size", "4", "--save_steps", "2", "--output_dir", str(out),
              "--compute_dtype", "fp32"]
    run_script("uniform_finetune.py", *common, "--max_steps", "2")
    again = run_script("uniform_finetune.py", *common, "--max_steps", "2", check=False)
    assert again.returncode == 2 and "already holds files; pass --resume_from_checkpoint" in again.stderr
    # Bare flag = latest checkpoint; --local-rank=0 is what torch.distributed.launch adds.
    resumed = run_script("uniform_finetune.py", *common, "--max_steps", "4", "--resume_from_checkpoint",
                         "--local-rank=0")
    assert "checkpoint-2" in resumed.stdout + resumed.stderr or json.load(open(out / "metrics.json"))["steps"] == 4
    assert json.load(open(out / "metrics.json"))["steps"] == 4


def test_seed_command_verbatim_names_the_missing_data(stories_dir: str) -> None:
    argv = shlex.split(SEED_COMMANDS[0].replace("PATH", stories_dir))
    proc = run_script("uniform_finetune.py", *argv, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "alpaca_data_cleaned.json" in lines[0] and "download alpaca" in lines[0]


def test_wrong_flags_name_the_choices(stories_dir: str) -> None:
    proc = run_script("uniform_finetune.py", "--model_type", "lama", "--model_name_or_path", stories_dir,
                      "--data", "x.json", check=False)
    assert proc.returncode == 2 and "known types: llama, chatglm" in proc.stderr
    proc = run_script("uniform_finetune.py", "--model_name_or_path", stories_dir, "--data", "alpaca",
                      "--peft_type", "lorra", check=False)
    assert "valid choices: lora, adalora, prompt, p_tuning, prefix, full" in proc.stderr


def test_hub_failure_is_one_clear_sentence(alpaca_file: str) -> None:
    proc = run_script("uniform_finetune.py", "--model_name_or_path", "no-such-org/no-such-model", "--data",
                      alpaca_file, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "not a local folder and the Hugging Face hub could not serve it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fp16_on_cpu_is_replaced_with_a_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on GPUs")
    dtype, note = resolve_dtype("fp16")
    assert dtype in (torch.bfloat16, torch.float32) and "100x slower" in note


def test_converted_raw_files_train(tmp_path, stories_dir: str) -> None:
    # The collection's converters feed training: FLAN CoT (single-turn) and ShareGPT (multi-turn).
    from tests.conftest import shared_path

    for raw, name in ((("flan_v2_cot", "qasc_train.tsv"), "cot.json"), (("fastchat", "dummy_conversation.json"),
                                                                         "chat.json")):
        run_script("data/collection.py", "convert", shared_path("data", "raw", *raw), str(tmp_path / name))
    args = _args(stories_dir, str(tmp_path / "cot.json"), tmp_path / "out", max_steps=2)
    args.data.append(str(tmp_path / "chat.json"))
    metrics, _ = run_finetune(args)
    assert metrics["steps"] == 2 and metrics["train_loss"] > 0


def test_auto_model_type_packs(tmp_path, stories_dir: str, alpaca_file: str) -> None:
    # --model_type auto loads through AutoModelForCausalLM; packing is decided on the class it loads.
    metrics, _ = run_finetune(_args(stories_dir, alpaca_file, tmp_path / "out", model_type="auto"))
    assert metrics["packing"] is True and metrics["padding_fraction"] == 0


def test_flops_per_token_counts_a_tied_head_once(tmp_path, stories_dir: str) -> None:
    from alpaca_cot.flops import training_flops_per_token

    base = transformers.AutoModelForCausalLM.from_pretrained(stories_dir)
    config = base.config
    hidden, vocab = config.hidden_size, config.vocab_size
    blocks = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n or n.endswith("norm.weight"))
    for tied in (False, True):
        config.tie_word_embeddings = tied
        model = transformers.LlamaForCausalLM(config)
        # Non-embedding N = blocks + final norm + the head (a matmul per token), tied or not.
        assert training_flops_per_token(model, full=True, mean_context=0) == 6 * (blocks + hidden * vocab)


def test_fast_dropout_drops_at_the_rate_and_keeps_the_mean() -> None:
    from alpaca_cot.adapters import FastDropout

    torch.manual_seed(0)
    x = torch.ones(1000, 1001, requires_grad=True)  # an odd element count: the last 64-bit draw is partly used
    dropout = FastDropout(0.05).train()
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002
    assert abs(y.mean().item() - 1) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * y.max())  # the gradient is the same mask and scale
    assert torch.equal(dropout.eval()(x), x)


def test_throughput_leaves_out_evaluations_inside_training_only(tmp_path, monkeypatch, stories_dir: str,
                                                                 alpaca_file: str) -> None:
    import time

    calls = []
    evaluate = transformers.Trainer.evaluate

    def slow_evaluate(self, *args, **kwargs):  # each evaluation takes 1 s more
        calls.append(1)
        time.sleep(1)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow_evaluate)
    metrics, _ = run_finetune(_args(stories_dir, alpaca_file, tmp_path / "out", val_set_size=4, eval_steps=1))
    inside = len(calls) - 1  # the last evaluation runs after train() and is not part of train_runtime
    assert inside >= 2
    left_out = metrics["train_runtime_s"] - metrics["train_loop_seconds"]
    # The evaluations inside train() are left out, but not the one after it (its 1 s of sleep alone).
    assert inside <= left_out < inside + 1
