"""Fine-tuning end to end on tiny models built in code (and on real data and models where ../shared is)."""

from __future__ import annotations

import json
import os
import shlex
import shutil

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import alpaca_cot.training.run as training
from alpaca_cot.cli import check_argv, normalize_argv
from alpaca_cot.config import FinetuneArgs
from alpaca_cot.errors import UserError
from alpaca_cot.models.loading import resolve_dtype
from alpaca_cot.training.report import TRUNCATION_FILE
from alpaca_cot.training.run import run_finetune
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
    import uniform_finetune

    for argv in argvs:  # every seed command passes the flag check
        check_argv(argv, uniform_finetune.main)


@pytest.mark.slow
def test_main_run_learns_and_saves_everything(trained_adapter: str) -> None:
    metrics = json.load(open(os.path.join(trained_adapter, "metrics.json")))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.05
    assert metrics["effective_tokens_per_s"] > 0 and metrics["matmul_peak_gflops"] > 1
    assert 0 < metrics["mfu"] < 1.5 and metrics["flops_per_token"] > 0
    # Packing is on by default: no padding, and one optimizer step per batch of 8 records.
    assert metrics["packing"] is True and metrics["padding_fraction"] == 0
    assert metrics["attention"] == "varlen_sdpa"
    assert metrics["steps"] == -(-metrics["train_records"] // 8)
    for name in ("adapter_config.json", "tokenizer.json", "finetune_args.json", "template.json", "loss_curve.png"):
        assert os.path.isfile(os.path.join(trained_adapter, name)), name
    with open(os.path.join(trained_adapter, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(trained_adapter, "finetune_args.json")))
    assert saved["lora_target_modules"] == ["q_proj", "v_proj"] and saved["model_type"] == "llama"
    # The seed's state_dict monkeypatch saved 443-byte adapters holding no weights.
    weights = load_file(os.path.join(trained_adapter, "adapter_model.safetensors"))
    layers = transformers.AutoConfig.from_pretrained(saved["model_name_or_path"]).num_hidden_layers
    assert len(weights) == layers * 2 * 2  # (q_proj, v_proj) x (A, B) per layer
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def _args(model_dir: str, data: str, out, **kw) -> FinetuneArgs:
    base = {"model_type": "llama", "model_name_or_path": model_dir, "data": [data], "val_set_size": 0,
            "max_steps": 3, "per_gpu_train_batch_size": 4, "learning_rate": 1e-2, "output_dir": str(out),
            "compute_dtype": "fp32", "logging_steps": 1, "cutoff_len": 128}
    return FinetuneArgs(**{**base, **kw})


def test_reloaded_adapter_reproduces_trained_logits(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    _, model = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "out"))
    probe = torch.tensor([[1, 41, 38, 36, 44, 26, 34, 31, 13]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        base_logits = base(input_ids=probe).logits
        reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()(input_ids=probe).logits
    assert not torch.equal(trained, base_logits)
    assert torch.equal(trained, reloaded)


@pytest.mark.parametrize("extra", [{"peft_type": "lora"}, {"peft_type": "adalora"}, {"peft_type": "prompt"},
                                   {"peft_type": "p_tuning"}, {"peft_type": "prefix"}, {"peft_type": "full"},
                                   {"use_dora": True}, {"use_rslora": True}, {"lora_target_modules": ["all"]}],
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items())[:40])
def test_every_peft_method_changes_its_trainable_weights(tmp_path, monkeypatch, tiny_model_dir: str,
                                                         tiny_data_file: str, extra: dict) -> None:
    # AdaLoRA runs with its defaults: its schedule scales with the run (3 steps here).
    initial: dict[str, torch.Tensor] = {}
    apply_peft = training.apply_peft

    def capturing_apply_peft(*args, **kwargs):
        model = apply_peft(*args, **kwargs)
        initial.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return model

    monkeypatch.setattr(training, "apply_peft", capturing_apply_peft)
    metrics, model = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "out", **extra))
    assert metrics["steps"] == 3 and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert initial and set(trained) <= set(initial)
    changed = [n for n in trained if not torch.equal(trained[n], initial[n])]
    # Every trainable tensor moves (AdaLoRA's rank-pruning masks and DoRA's magnitudes included).
    assert len(changed) >= 0.9 * len(trained), sorted(set(trained) - set(changed))[:5]
    names = os.listdir(tmp_path / "out")
    assert ("model.safetensors" if extra.get("peft_type") == "full" else "adapter_model.safetensors") in names


def test_same_seed_gives_identical_adapters_and_losses(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        metrics, _ = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / name, seed=seed, val_set_size=8,
                                        lora_dropout=0.1))
        runs.append((metrics, load_file(str(tmp_path / name / "adapter_model.safetensors"))))
    (ma, wa), (mb, wb), (_, wc) = runs
    assert ma["train_loss"] == mb["train_loss"] and ma["eval_loss_after"] == mb["eval_loss_after"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters


def _steps_run(monkeypatch) -> list[int]:
    """Count the optimizer steps this process trains (to prove a resume did not start again from 0)."""
    steps: list[int] = []
    original = training.RunTotals.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        steps.append(state.global_step)
        original(self, args, state, control, **kwargs)

    monkeypatch.setattr(training.RunTotals, "on_step_end", on_step_end)
    return steps


@pytest.mark.parametrize("val_set_size", [0, 8])
def test_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, tiny_model_dir: str, tiny_data_file: str,
                                             val_set_size: int) -> None:
    kw = {"max_steps": 6, "save_steps": 2, "eval_steps": 3, "val_set_size": val_set_size, "lora_dropout": 0.1,
          "per_gpu_train_batch_size": 8}
    whole, _ = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "whole", **kw))
    # A run killed after its step-4 checkpoint: what is left on disk is checkpoint-2 and checkpoint-4.
    run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "killed", **kw))
    killed = tmp_path / "killed"
    for name in os.listdir(killed):
        if name not in ("checkpoint-4", "checkpoint-2", "run.json"):  # the marker is written before training
            path = killed / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    steps = _steps_run(monkeypatch)
    resumed, _ = run_finetune(_args(tiny_model_dir, tiny_data_file, killed, resume_from_checkpoint=True, **kw))
    assert steps == [5, 6]  # state taken from checkpoint-4: only the last two steps ran
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    for key in ("train_loss", "effective_tokens", "steps"):  # metrics.json covers the whole run
        assert resumed[key] == whole[key], key
    if val_set_size:
        assert resumed["eval_loss_after"] == whole["eval_loss_after"]
        assert resumed["eval_loss_before"] == whole["eval_loss_before"]


# AdaLoRA saves its pruned ranks, prefix tuning its encoder's output: each restores its own way.
@pytest.mark.parametrize("peft_type", ["lora", pytest.param("adalora", marks=pytest.mark.slow),
                                       pytest.param("prefix", marks=pytest.mark.slow)])
def test_kill_during_the_final_save_still_reports_the_whole_run(tmp_path, monkeypatch, tiny_model_dir: str,
                                                                tiny_data_file: str, peft_type: str) -> None:
    kw = {"max_steps": 4, "save_steps": 2, "val_set_size": 8, "peft_type": peft_type}
    whole, whole_model = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "whole", **kw))
    run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "out", **kw))
    final = (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
    for name in os.listdir(tmp_path / "out"):  # the final outputs never made it; checkpoint-4 did
        if not name.startswith("checkpoint-") and name != "run.json":  # the marker is written before training
            (tmp_path / "out" / name).unlink()
    steps = _steps_run(monkeypatch)
    resumed, model = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "out", resume_from_checkpoint=True,
                                        **kw))
    assert steps == []
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == final  # the finished run's weights
    assert resumed["train_loss"] == whole["train_loss"] > 0
    assert resumed["effective_tokens"] == whole["effective_tokens"] > 0 and resumed["mfu"] > 0
    # The final evaluation and the returned model are the finished run's, not the untrained model's.
    assert resumed["eval_loss_before"] == whole["eval_loss_before"]
    assert peft_type != "lora" or whole["eval_loss_before"] > whole["eval_loss_after"] + 0.01  # apart, for LoRA
    assert abs(resumed["eval_loss_after"] - whole["eval_loss_after"]) < 1e-4
    # AdaLoRA comes back resized to the ranks it kept, prefix tuning as inference loads it (its saved prompt).
    if peft_type == "lora":
        trained = dict(whole_model.named_parameters())
        assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_output_dir_protection_and_resume_from_the_command_line(tmp_path, tiny_model_dir: str,
                                                                 tiny_data_file: str) -> None:
    out = tmp_path / "out"
    common = ["--model_type", "llama", "--model_name_or_path", tiny_model_dir, "--data", tiny_data_file,
              "--val_set_size", "0", "--per_gpu_train_batch_size", "4", "--save_steps", "2", "--output_dir", str(out),
              "--compute_dtype", "fp32"]
    run_script("uniform_finetune.py", *common, "--max_steps", "2")
    again = run_script("uniform_finetune.py", *common, "--max_steps", "2", check=False)
    assert again.returncode == 2 and "already holds files; pass --resume_from_checkpoint" in again.stderr
    # Bare flag = latest checkpoint; --local-rank=0 is what torch.distributed.launch adds.
    run_script("uniform_finetune.py", *common, "--max_steps", "4", "--resume_from_checkpoint", "--local-rank=0")
    assert json.load(open(out / "metrics.json"))["steps"] == 4


@pytest.mark.slow
def test_seed_command_verbatim_names_the_missing_data(tiny_model_dir: str) -> None:
    argv = shlex.split(SEED_COMMANDS[0].replace("PATH", tiny_model_dir))
    proc = run_script("uniform_finetune.py", *argv, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "alpaca_data_cleaned.json" in lines[0] and "download alpaca" in lines[0]


# (flag, value, what the one-line error says): each used to train silently or end in a traceback.
BAD_FLAGS = [
    ("val_set_size", -1, "--val_set_size -1 is out of range: it must be at least 0"),
    ("max_samples", -5, "--max_samples -5 is out of range"),
    ("epochs", 0, "--epochs 0 is out of range: it must be above 0"),
    ("epochs", -1, "--epochs -1 is out of range"),
    ("lora_alpha", 0, "--lora_alpha 0 is out of range: it must be above 0"),
    ("lora_r", 0, "--lora_r 0 is out of range: it must be at least 1"),
    ("learning_rate", -1, "--learning_rate -1 is out of range"),
    ("per_gpu_train_batch_size", 0, "--per_gpu_train_batch_size 0 is out of range"),
    ("gradient_accumulation_steps", 0, "--gradient_accumulation_steps 0 is out of range"),
    ("lora_dropout", 1.5, "--lora_dropout 1.5 is out of range: it must be below 1"),
    ("warmup_ratio", -1, "--warmup_ratio -1 is out of range"),
    ("max_steps", 0, "--max_steps 0 trains nothing"),
    ("seed", -3, "--seed -3 is out of range"),
    ("lora_r", "abc", "--lora_r must be a whole number, got 'abc'"),
    ("model_type", "lama", "valid choices: llama, chatglm"),
    ("peft_type", "lorra", "valid choices: lora, adalora, prompt, p_tuning, prefix, full"),
    ("compute_dtype", "fp64", "valid choices: auto, fp32, bf16, fp16"),
    ("quantization_bit", 3, "valid choices: 8, 4"),
]


@pytest.mark.parametrize("name,value,message", BAD_FLAGS, ids=[f"{n}={v}" for n, v, _ in BAD_FLAGS])
def test_every_invalid_value_is_one_line_before_any_work(tmp_path, name: str, value, message: str) -> None:
    import uniform_finetune

    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        uniform_finetune.main(model_name_or_path="m", data=["d.json"], output_dir=str(out), **{name: value})
    assert not out.exists()  # nothing created


def test_output_dir_naming_a_file_is_refused(tmp_path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    with pytest.raises(UserError, match="is an existing file"):
        FinetuneArgs(model_name_or_path="m", data=["d.json"], output_dir=str(existing))
    assert existing.read_text() == "mine"


def test_unknown_flag_stops_at_once_naming_the_closest(tmp_path) -> None:
    import uniform_finetune

    with pytest.raises(UserError, match=r"unknown flag --lora_rank; did you mean --lora_r"):
        check_argv(["--model_name_or_path", "m", "--lora_rank", "16"], uniform_finetune.main)
    with pytest.raises(UserError, match="unknown flag --zero_stage"):
        check_argv(["--zero_stage", "3"], uniform_finetune.main)
    with pytest.raises(UserError, match="unexpected argument 'stray'"):
        check_argv(["stray", "--data", "x"], uniform_finetune.main)
    for spelling in ("--nopacking", "--packing=False"):  # each spelling alone: a flag given twice is refused
        check_argv([spelling, "--data", "a", "--help"], uniform_finetune.main)


@pytest.mark.slow
def test_unknown_flag_exits_2_before_training(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    out = tmp_path / "out"
    proc = run_script("uniform_finetune.py", "--model_name_or_path", tiny_model_dir, "--data", tiny_data_file,
                      "--lora_rank", "16", "--output_dir", str(out), check=False)
    assert proc.returncode == 2 and "did you mean --lora_r" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


SCRIPTS = ["uniform_finetune.py", "generate.py", "predict.py", "merge.py", "server.py", "web.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_help_lists_its_flags_with_their_help(script: str) -> None:
    proc = run_script(script, "--help")
    text = proc.stdout + proc.stderr
    shared = {"uniform_finetune.py": ["--lora_r", "LoRA rank", "--cutoff_len", "--compute_dtype"],
              "web.py": ["--num_beams", "--seed", "--api_key", "--template", "beam search width"],
              "merge.py": ["--merged_dir", "--lora_dir"]}.get(script, ["--lora_dir", "--max_new_tokens",
                                                                         "--template", "--seed"])
    for needle in shared:
        assert needle in text, needle


def test_one_definition_of_each_flag() -> None:
    # The inference scripts share the model and sampling flags; their defaults differ only where a script
    # says so (predict is greedy, merge runs in fp32).
    import inspect

    import generate
    import merge
    import predict
    import server
    import web

    def defaults(main) -> dict:
        return {n: p.default for n, p in inspect.signature(main).parameters.items()}

    gen, pred, chat, serve = (defaults(m.main) for m in (generate, predict, server, web))
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "seed", "template",
                 "compute_dtype", "lora_dir", "quantization_bit"):
        assert gen[name] == chat[name] == serve[name], name
    assert gen["do_sample"] is True and pred["do_sample"] is False
    assert defaults(merge.main)["compute_dtype"] == "fp32" and gen["compute_dtype"] == "auto"


@pytest.mark.slow
def test_hub_failure_is_one_clear_sentence(tiny_data_file: str) -> None:
    proc = run_script("uniform_finetune.py", "--model_name_or_path", "no-such-org/no-such-model", "--data",
                      tiny_data_file, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "not a local folder and the Hugging Face hub could not serve it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compute_dtype_auto_is_measured_not_guessed() -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU, auto is bf16 where supported")
    dtype, note = resolve_dtype("auto")
    assert "bf16" in note and "fp32" in note and "GFLOP/s" in note  # both probe rates are logged
    assert f"using {'bf16' if dtype == torch.bfloat16 else 'fp32'}" in note
    dtype16, note16 = resolve_dtype("fp16")
    assert dtype16 == dtype and "no fast kernels on CPU" in note16


def test_converted_raw_files_train(tmp_path, tiny_model_dir: str) -> None:
    # The collection's converters feed training: FLAN CoT (single-turn) and ShareGPT (multi-turn).
    from tests.conftest import shared_path

    for raw, name in ((("flan_v2_cot", "qasc_train.tsv"), "cot.json"), (("fastchat", "dummy_conversation.json"),
                                                                         "chat.json")):
        run_script("data/collection.py", "convert", shared_path("data", "raw", *raw), str(tmp_path / name))
    args = _args(tiny_model_dir, str(tmp_path / "cot.json"), tmp_path / "out", max_steps=2)
    args.data.append(str(tmp_path / "chat.json"))
    metrics, _ = run_finetune(args)
    assert metrics["steps"] == 2 and metrics["train_loss"] > 0


def test_auto_model_type_packs_with_the_exact_attention(tmp_path, tiny_tokenizer_dir: str,
                                                        tiny_data_file: str) -> None:
    # --model_type auto loads through AutoModelForCausalLM; the loaded config decides the packed path:
    # Gemma 2's softcapping takes transformers' own packed attention (it used to crash).
    for config_class, overrides, attention in (("LlamaConfig", {}, "varlen_sdpa"),
                                               ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}, "stock")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
        model_dir = tmp_path / config_class
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        metrics, _ = run_finetune(_args(str(model_dir), tiny_data_file, tmp_path / f"out-{config_class}",
                                        model_type="auto", template="alpaca"))
        assert metrics["packing"] is True and metrics["padding_fraction"] == 0
        assert metrics["attention"] == attention


def test_flops_per_token_counts_a_tied_head_once(tiny_model_dir: str) -> None:
    from alpaca_cot.training.flops import training_flops_per_token

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = base.config
    hidden, vocab = config.hidden_size, config.vocab_size
    blocks = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n or n.endswith("norm.weight"))
    for tied in (False, True):
        config.tie_word_embeddings = tied
        model = transformers.LlamaForCausalLM(config)
        # Non-embedding N = blocks + final norm + the head (a matmul per token), tied or not.
        assert training_flops_per_token(model, full=True, mean_context=0) == 6 * (blocks + hidden * vocab)


def test_truncated_records_are_listed_beside_the_run(tmp_path, tiny_model_dir: str) -> None:
    records = [{"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "Tell a story.", "input": "", "output": "once upon a time " * 80},
               {"instruction": "word " * 300, "input": "", "output": "short answer"}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    metrics, _ = run_finetune(_args(tiny_model_dir, str(data), tmp_path / "out", max_steps=1, cutoff_len=160))
    listed = [json.loads(line) for line in open(tmp_path / "out" / TRUNCATION_FILE)]
    assert sorted(e["index"] for e in listed) == [1, 2]
    assert all(e["action"] == "cut" and e["kept_tokens"] == 160 < e["tokens"] for e in listed)
    assert metrics["train_records"] == 3  # the record whose prompt alone is too long is kept: its answer fits


@pytest.mark.slow
def test_throughput_leaves_out_evaluations_inside_training_only(tmp_path, monkeypatch, tiny_model_dir: str,
                                                                 tiny_data_file: str) -> None:
    import time

    calls = []
    evaluate = transformers.Trainer.evaluate

    def slow_evaluate(self, *args, **kwargs):  # each evaluation takes 1 s more
        calls.append(1)
        time.sleep(1)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow_evaluate)
    metrics, _ = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "out", val_set_size=4, eval_steps=1))
    inside = len(calls) - 1  # the last evaluation runs after train() and is not part of train_runtime
    assert inside >= 2
    left_out = metrics["train_runtime_s"] - metrics["train_loop_seconds"]
    # The evaluations inside train() are left out, but not the one after it (its 1 s of sleep alone).
    assert inside <= left_out < inside + 1
