"""The distributed engines (alpaca_cot/training/engines.py): shipped DeepSpeed configs, flag conflicts as one line,
the Trainer keywords each engine gets, and end-to-end runs against a plain single-process run.

On CPU: DeepSpeed ZeRO-2/3 in one process (DeepSpeed's CPU accelerator; the Trainer's set-up counts one
process without a GPU, so several CPU processes are refused); the 2-process equivalence runs are DDP's
(tests/test_ddp.py). FSDP runs only on GPUs through the Trainer: its tests need CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.errors import UserError
from alpaca_cot.models.loading import quantization_config
from alpaca_cot.training import engines
from alpaca_cot.training.engines import (
    DEEPSPEED_PRESETS,
    EnginePlan,
    decoder_layer_classes,
    gathered_state_dict,
    plan_engine,
    read_deepspeed_config,
    resolve_deepspeed_config,
)
from alpaca_cot.training.run import describe_loaded
from tests.conftest import run_script
from tests.test_ddp import ADAPTER_ATOL, assert_trained, finetune, lora_flags, max_weight_diff


def _args(tmp_path, **flags) -> FinetuneArgs:
    return FinetuneArgs(model_name_or_path=str(tmp_path), data=["records.json"], output_dir=str(tmp_path / "out"),
                        **flags)


@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_shipped_deepspeed_configs(name: str) -> None:
    path = resolve_deepspeed_config(name)
    assert os.path.isabs(path) and path.endswith(f"{name}.json")
    config = read_deepspeed_config(path)
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[len("zero")])
    # The Trainer fills these from our flags, so the configs never disagree with them.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    offload = name.endswith("_offload")
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert (zero.get("offload_param", {}).get("device") == "cpu") == (offload and zero["stage"] == 3)
    if offload:  # DeepSpeed's CPU Adam, with the Trainer's learning rate
        assert config["optimizer"]["params"]["lr"] == "auto"
    if zero["stage"] == 3:  # the save gathers the partitioned weights
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(("flags", "message"), [
    ({"deepspeed": "zero2", "fsdp": True}, "--deepspeed and --fsdp are two sharding engines"),
    ({"fsdp_offload": True}, "--fsdp_offload applies to FSDP only"),
    ({"fsdp": True, "quantization_bit": 8}, "--fsdp cannot shard 8-bit weights"),
    ({"deepspeed": "zero2", "fsdp": "shard_grad_op"}, "--deepspeed and --fsdp are two sharding engines"),
    ({"fsdp": "hybrid_shard"}, "--fsdp hybrid_shard: FSDP1's sharding strategy, which FSDP2 .* does not offer"),
    ({"fsdp": "no_shard auto_wrap"}, "--fsdp no_shard: FSDP1's sharding strategy"),
    ({"fsdp": "full_shard shard_grad_op"}, "full_shard and shard_grad_op are two sharding strategies; pass one"),
    ({"fsdp": "full_shard autowrap"}, "'autowrap' is not an FSDP option; valid words: full_shard, shard_grad_op, "
                                      "offload, auto_wrap"),
])
def test_conflicting_engine_flags_are_one_line(tmp_path, flags: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        _args(tmp_path, **flags)
    assert "\n" not in str(e.value)


def _bad_json(tmp_path) -> str:
    path = tmp_path / "bad.json"
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    return str(path)


def _stage5(tmp_path) -> str:
    path = tmp_path / "stage5.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    return str(path)


@pytest.mark.parametrize(("flags", "cuda", "world", "launched", "message"), [
    ({"deepspeed": "zero4"}, True, 2, True, "--deepspeed 'zero4' is neither a shipped config"),
    ({"deepspeed": _bad_json}, True, 2, True, "bad.json line 1: not valid JSON"),
    ({"deepspeed": _stage5}, True, 2, True, "zero_optimization.stage 5 is not valid; valid choices: 0, 1, 2, 3"),
    ({"deepspeed": "zero3", "quantization_bit": 4}, True, 2, True, "--quantization_bit with ZeRO-3"),
    ({"deepspeed": "zero2"}, True, 1, False, "--deepspeed runs under a launcher"),
    ({"deepspeed": "zero2"}, False, 2, True, "--deepspeed on CPU runs one process only"),
    ({"fsdp": True}, False, 2, True, "--fsdp needs CUDA GPUs"),
    ({"fsdp": True}, True, 1, False, "--fsdp runs under a launcher"),
    ({"fsdp": True, "peft_type": "adalora"}, True, 2, True, "--peft_type adalora cannot run under --fsdp"),
    ({"deepspeed": "zero2", "peft_type": "adalora"}, True, 2, True, "--peft_type adalora cannot run under "
                                                                     "--deepspeed zero2"),
])
def test_engines_that_cannot_run_here_are_one_line(tmp_path, monkeypatch, flags: dict, cuda: bool, world: int,
                                                   launched: bool, message: str) -> None:
    flags = {k: v(tmp_path) if callable(v) else v for k, v in flags.items()}
    if launched:
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = _args(tmp_path, **flags)
    with pytest.raises(UserError, match=message) as e:
        plan_engine(args, cuda=cuda, world=world)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny_lora_model(tiny_model_dir: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_fsdp_wraps_each_decoder_layer(tmp_path, monkeypatch, tiny_lora_model) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    plan = plan_engine(_args(tmp_path, fsdp=True, fsdp_offload=True), cuda=True, world=2)
    kwargs = plan.training_kwargs(tiny_lora_model)
    assert kwargs["fsdp"] is True
    config = kwargs["fsdp_config"]
    assert config["version"] == 2 and config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert config["state_dict_type"] == "FULL_STATE_DICT" and config["cpu_offload"] is True
    assert plan.params_sharded and plan.load_device == torch.device("cpu") and not plan.use_cpu
    # transformers reads these keywords as given (a typo would raise there); one process, no launcher
    monkeypatch.delenv("LOCAL_RANK")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, **kwargs)
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


@pytest.mark.parametrize(("value", "reshard", "offload"), [
    (True, True, False), ("full_shard auto_wrap", True, False), ("shard_grad_op", False, False),
    ("full_shard offload auto_wrap", True, True), ("offload", True, True), ("shard_grad_op,offload", False, True),
    ("auto_wrap", True, False),
])
def test_fsdp_takes_the_trainers_words_with_their_meaning(tmp_path, monkeypatch, tiny_lora_model, value: str | bool,
                                                         reshard: bool, offload: bool) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = _args(tmp_path, fsdp=value)
    assert args.fsdp == value  # kept as given: a run's finetune_args.json replays it
    kwargs = plan_engine(args, cuda=True, world=2).training_kwargs(tiny_lora_model)
    assert (kwargs["fsdp_config"]["reshard_after_forward"], kwargs["fsdp_config"]["cpu_offload"]) == (reshard, offload)
    # The Trainer's own reading of the same words (TrainingArguments' FSDP2 translation) gives the same plugin.
    monkeypatch.delenv("LOCAL_RANK")
    ours = transformers.TrainingArguments(output_dir=str(tmp_path / "a"), use_cpu=True, **kwargs).fsdp_plugin_args
    words = value.replace(",", " ") if isinstance(value, str) else value  # fire reads "a,b" as a list
    theirs = transformers.TrainingArguments(output_dir=str(tmp_path / "b"), use_cpu=True, fsdp=words,
                                            fsdp_config={"version": 2}).fsdp_plugin_args
    for key in ("reshard_after_forward", "cpu_offload"):
        assert ours.get(key, False) == theirs.get(key, False) == {"reshard_after_forward": reshard,
                                                                  "cpu_offload": offload}[key], key


@pytest.mark.parametrize("value", [False, "", "false"])
def test_fsdp_off(tmp_path, value: str | bool) -> None:
    assert plan_engine(_args(tmp_path, fsdp=value), cuda=True, world=1).engine == "ddp"


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    plan = plan_engine(_args(tmp_path, fsdp=True, quantization_bit=4), cuda=True, world=2)
    assert plan.quant_storage(torch.bfloat16) == torch.bfloat16
    assert not plan.kbit_preparation  # peft's fp32 upcast would mix dtypes within FSDP's units
    assert plan.load_device is None  # bitsandbytes quantizes on the GPU
    assert quantization_config(4, torch.bfloat16, plan.quant_storage(torch.bfloat16)).bnb_4bit_quant_storage \
        == torch.bfloat16
    assert quantization_config(4, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    ddp = plan_engine(_args(tmp_path, quantization_bit=4), cuda=True, world=2)
    assert ddp.quant_storage(torch.bfloat16) is None and ddp.kbit_preparation


def test_plans_without_sharding(tmp_path, monkeypatch, tiny_lora_model) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    ddp = plan_engine(_args(tmp_path), cuda=False, world=2)
    assert ddp.engine == "ddp" and ddp.training_kwargs(tiny_lora_model) == {} and ddp.use_cpu
    assert ddp.load_device is None and not ddp.params_sharded
    zero2 = plan_engine(_args(tmp_path, deepspeed="zero2"), cuda=False, world=1)
    # use_cpu would switch DeepSpeed off: a CPU process runs DeepSpeed's CPU accelerator instead
    assert zero2.training_kwargs(tiny_lora_model) == {"deepspeed": resolve_deepspeed_config("zero2")}
    assert not zero2.use_cpu and zero2.zero_stage == 2 and not zero2.params_sharded


def _trained(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _assert_adapter(model, state: dict, expected: dict) -> None:
    """``state`` saves (through peft, as ``save_pretrained`` does) exactly the adapter ``expected``."""
    saved = peft.get_peft_model_state_dict(model, state_dict=state)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_zero3_adapter_save_gathers_only_the_adapter(monkeypatch, tiny_lora_model) -> None:
    """What is gathered, seen by a spy in DeepSpeed's place: the adapter's weights, none of the frozen base's
    (accelerate's get_state_dict gathers the whole 16-bit model); the whole runs are compared below."""
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    gathered: list = []

    @contextlib.contextmanager
    def spy(params: list, *args, **kwargs):
        gathered.extend(params)
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", spy)
    monkeypatch.setattr(engines, "is_deepspeed_zero3_enabled", lambda: True)
    trainer = SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False, model=tiny_lora_model,
                              is_world_process_zero=lambda: True)
    state = gathered_state_dict(trainer)
    trained = _trained(tiny_lora_model)
    assert [id(p) for p in gathered] == [id(p) for p in trained] and len(trained) == 8  # 2 layers x q, v x A, B
    _assert_adapter(tiny_lora_model, state, peft.get_peft_model_state_dict(tiny_lora_model))
    trainer.is_world_process_zero = lambda: False
    assert gathered_state_dict(trainer) is None and len(gathered) == 16  # every rank takes part


@pytest.fixture
def one_process_group():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_fsdp_adapter_save_gathers_only_the_adapter(monkeypatch, tiny_model_dir: str, one_process_group) -> None:
    """FSDP2 (fully_shard, each decoder layer a unit, in one gloo process): the save all-gathers the adapter's
    DTensors only, counted at DTensor.redistribute, and they are the adapter's values."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    gathered: list = []
    redistribute = DTensor.redistribute

    def spy(self, *args, **kwargs):
        gathered.append(tuple(self.shape))
        return redistribute(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "redistribute", spy)
    state = gathered_state_dict(SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=True, model=model))
    assert sorted(gathered) == sorted(tuple(p.shape) for p in _trained(model)) and len(gathered) == 8
    _assert_adapter(model, state, expected)


def test_fsdp_needs_decoder_layer_classes() -> None:
    with pytest.raises(UserError, match="Linear names no decoder layer class"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


def test_a_run_leaves_its_process_group() -> None:
    """uniform_finetune.py tears its process group down before Python's finalisation (where gloo can abort a rank
    and its launcher then kill the others); without a group it does nothing."""
    engines.leave_process_group()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        engines.leave_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_custom_deepspeed_config_is_saved_as_an_absolute_path(tmp_path, monkeypatch) -> None:
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    monkeypatch.chdir(tmp_path)
    args = _args(tmp_path, deepspeed="mine.json")
    assert args.deepspeed == str(config)
    assert EnginePlan("deepspeed", False, args.deepspeed, 1).training_kwargs(None) == {"deepspeed": str(config)}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize(("words", "error"), [
    ([], "error: --fsdp needs CUDA GPUs"),
    (["full_shard auto_wrap"], "error: --fsdp needs CUDA GPUs"),  # the Trainer's spelling reaches the plan
    (["full_shard,offload"], "error: --fsdp needs CUDA GPUs"),
    (["full_shard autowrap"], "error: --fsdp 'full_shard autowrap': 'autowrap' is not an FSDP option; valid "
                              "words: full_shard, shard_grad_op, offload, auto_wrap"),
])
def test_fsdp_on_cpu_stops_before_any_work(tmp_path, tiny_model_dir: str, tiny_data_file: str, words: list[str],
                                           error: str) -> None:
    proc = run_script("uniform_finetune.py", "--model_name_or_path", tiny_model_dir, "--data", tiny_data_file,
                      "--fsdp", *words, "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(error)
    assert not os.path.exists(tmp_path / "out")


# --- end to end -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, tiny_model_dir: str, tiny_data_file: str) -> dict:
    """Plain single-process runs (LoRA and full) that the engines must reproduce: global batch 4 x 2."""
    root = tmp_path_factory.mktemp("reference")
    batch = ["--per_gpu_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    flags = lora_flags(tiny_model_dir, tiny_data_file, str(root / "cache")) + batch
    full_flags = lora_flags(tiny_model_dir, tiny_data_file, str(root / "cache"), learning_rate="1e-3") + batch + [
        "--peft_type", "full"]
    finetune(str(root / "lora"), *flags)
    assert_trained(str(root / "lora"))
    finetune(str(root / "full"), *full_flags)
    assert max_weight_diff(tiny_model_dir, str(root / "full"), "model.safetensors") > 100 * ADAPTER_ATOL  # trained
    return {"flags": flags, "full_flags": full_flags, "lora": str(root / "lora"), "full": str(root / "full")}


def _metrics(run: str) -> dict:
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
# zero3_offload runs DeepSpeed's CPU Adam, compiled on the first use (minutes; cached in ~/.cache/torch_extensions).
@pytest.mark.parametrize("preset", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_lora_on_cpu_equals_the_plain_run(tmp_path, preset: str, reference_runs: dict,
                                                    tiny_model_dir: str) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    out = str(tmp_path / preset)
    finetune(out, *reference_runs["flags"], "--deepspeed", preset, processes=1)
    metrics = _metrics(out)
    assert metrics["engine"] == "deepspeed" and metrics["steps"] == 3
    # counted on the whole model, not on this rank's ZeRO-3 partition
    assert metrics["flops_per_token"] == _metrics(reference_runs["lora"])["flops_per_token"]
    assert max_weight_diff(reference_runs["lora"], out) < ADAPTER_ATOL
    # So is a checkpoint's (the Trainer's save, through CountingTrainer.save_model: ZeRO-3 gathers the adapter only)
    checkpoint = os.path.join(reference_runs["lora"], "checkpoint-2")
    assert max_weight_diff(checkpoint, os.path.join(out, "checkpoint-2")) < ADAPTER_ATOL
    # The saved adapter is whole and loads alone in plain peft over the base model.
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, out)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.slow
def test_deepspeed_zero3_full_fine_tune_saves_the_gathered_model(tmp_path, reference_runs: dict) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    out = str(tmp_path / "zero3-full")
    finetune(out, *reference_runs["full_flags"], "--deepspeed", "zero3", processes=1)
    assert max_weight_diff(reference_runs["full"], out, "model.safetensors") < ADAPTER_ATOL
    assert _metrics(out)["flops_per_token"] == _metrics(reference_runs["full"])["flops_per_token"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no partitions left
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert all(p.numel() > 0 for p in model.parameters()) and len(saved) >= len(list(model.parameters()))


@pytest.mark.slow
def test_deepspeed_zero3_partitions_the_weights_as_they_load(tmp_path, reference_runs: dict,
                                                            tiny_model_dir: str) -> None:
    """ZeRO-3 partitions each weight inside from_pretrained (deepspeed.zero.Init, while the TrainingArguments'
    DeepSpeed config is alive), so no rank ever holds the whole model; not after loading it whole on every rank.
    One CPU process holds all the partitions: the proof is that the weights came out of loading partitioned."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    elements, tensors = sum(p.numel() for p in plain.parameters()), len(list(plain.parameters()))
    whole = f"model: {elements:,} weight elements in {tensors} tensors"
    assert describe_loaded(plain) == f"{whole}, whole on this rank"
    proc = finetune(str(tmp_path / "zero3"), *reference_runs["flags"], "--deepspeed", "zero3", processes=1)
    loaded = [line for line in proc.stdout.splitlines() if line.startswith("model: ")]
    assert loaded == [f"{whole}, partitioned by DeepSpeed ZeRO-3 as they loaded ({tensors} tensors); "
                      f"this rank holds {elements:,}"], proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Trainer runs FSDP only on GPUs")
def test_fsdp_lora_on_gpus_equals_the_plain_run(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    gpus = torch.cuda.device_count()
    flags = lora_flags(tiny_model_dir, tiny_data_file, str(tmp_path / "cache")) + [
        "--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    # One process with the same global batch: gpus x 2 records per step and rank.
    finetune(str(tmp_path / "plain"), *flags[:-4], "--per_gpu_train_batch_size", str(2 * gpus),
             "--gradient_accumulation_steps", "2")
    finetune(str(tmp_path / "fsdp"), *flags, "--fsdp", processes=gpus)
    metrics = json.load(open(tmp_path / "fsdp" / "metrics.json"))
    assert metrics["engine"] == "fsdp" and metrics["world_size"] == gpus
    assert max_weight_diff(str(tmp_path / "plain"), str(tmp_path / "fsdp")) < 1e-4  # GPU kernels: looser
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft.PeftModel.from_pretrained(base, str(tmp_path / "fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "kind"), [("zero2", "lora"), ("zero3", "lora"), ("zero3", "full"),
                                            ("zero3+scheduler", "lora"), ("zero2_offload", "lora")])
def test_deepspeed_run_resumes_from_its_checkpoint(tmp_path, preset: str, kind: str, tiny_model_dir: str,
                                                   tiny_data_file: str) -> None:
    """A DeepSpeed checkpoint (its optimizer in global_stepN/, named by ``latest``) is found complete (before,
    it read as "no optimizer.pt"), and a run killed after checkpoint-2, or during its final save, resumes to
    the whole run's weights bit for bit and its metrics (before, the second failed in the gathering). A config
    with its own "scheduler" keeps the schedule in DeepSpeed's states, without scheduler.pt (before, every such
    checkpoint read as incomplete), and so does one with its own "optimizer" (zero2_offload); warmup then decay, so a
    schedule restarted on resume would show."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed)")
    rate = "1e-3" if kind == "full" else "1e-2"
    # DeepSpeed builds the schedule where its config has a "scheduler", or an "optimizer" (the offload presets)
    own_schedule = preset.endswith("+scheduler") or preset.endswith("_offload")
    if preset.endswith("+scheduler"):
        config = read_deepspeed_config(resolve_deepspeed_config(preset.removesuffix("+scheduler")))
        config["scheduler"] = {"type": "WarmupDecayLR", "params": dict.fromkeys(
            ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"), "auto")}
        preset = str(tmp_path / "scheduler.json")
        with open(preset, "w", encoding="utf-8") as f:
            json.dump(config, f)
    flags = [*lora_flags(tiny_model_dir, tiny_data_file, str(tmp_path / "cache"), max_steps=4, val_set_size=8,
                         learning_rate=rate), "--save_steps", "2", "--deepspeed", preset, "--warmup_ratio", "0.5"]
    flags += ["--peft_type", "full"] if kind == "full" else []
    weights = "model.safetensors" if kind == "full" else "adapter_model.safetensors"
    whole = tmp_path / "whole"
    finetune(str(whole), *flags, processes=1)
    assert (whole / "checkpoint-2" / "scheduler.pt").exists() != own_schedule
    for kept in ("checkpoint-2", "checkpoint-4"):
        cut = tmp_path / f"cut-{kept}"
        shutil.copytree(whole, cut)
        for name in os.listdir(cut):  # the rest never made it
            if name not in (kept, "run.json"):  # a killed run keeps its marker, written before training
                shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
        proc = finetune(str(cut), *flags, "--resume_from_checkpoint", processes=1)
        assert f"resuming from {cut}/{kept}" in proc.stdout + proc.stderr
        # DeepSpeed's CPU Adam (the offload presets) keeps beta**step as a float running product, which a resumed
        # run recomputes with pow (deepspeed/ops/csrc/includes/cpu_adam.h): measured 1.4e-7 apart after resuming
        # from checkpoint-2; a schedule restarted at step 0 would train steps 3-4 at other learning rates.
        tolerance = 1e-6 if preset.endswith("_offload") and kept == "checkpoint-2" else 0
        assert max_weight_diff(str(whole), str(cut), weights) <= tolerance
        for key in ("train_loss", "effective_tokens", "steps"):
            assert _metrics(str(cut))[key] == _metrics(str(whole))[key], key
        # The final evaluation is the trained model's (after a restored final save, its checkpoint's weights).
        assert abs(_metrics(str(cut))["eval_loss_after"] - _metrics(str(whole))["eval_loss_after"]) < 1e-4
