"""--lora_dir takes any PEFT adapter: made by plain peft, laid out as the original project published its
checkpoints (adapter_config.json + adapter_model.bin, old peft fields), or a hub id; runs of ours keep working."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import peft
import pytest
import torch
import transformers

from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.merging import merge_adapter
from alpaca_cot.models.loading import infer_model_type, load_for_inference
from tests.conftest import run_script
from tests.fixtures.tiny_models import write_tiny_model

# The exact adapter_config.json of the original project's saved-alpaca-belle7b checkpoint (peft 0.2),
# with r set to this test's rank: its base is a folder on the authors' machine.
ORIGINAL_CONFIG = {"base_model_name_or_path": "/mnt/bn/qingyi-bn-lq/llama/llama-7b-hf", "bias": "none",
                   "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16,
                   "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None, "peft_type": "LORA",
                   "r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
GREEDY = SamplingParams(do_sample=False, max_new_tokens=8, repetition_penalty=1.0, no_repeat_ngram_size=0)
RECORDS = [{"instruction": "Tell me about alpacas.", "input": ""},
           {"instruction": "Add the numbers.", "input": "2 and 3"}]
# What the console must not show when an adapter loads (bitsandbytes' kernels notice, the
# is_gradient_checkpointing FutureWarning peft triggers, peft's warning about old config fields).
NOISE = ("gemm_4bit_forward", "FutureWarning", "Unexpected keyword arguments")


@pytest.fixture(scope="module")
def base_dir(stories_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the stories260K tokenizer."""
    return write_tiny_model(str(tmp_path_factory.mktemp("base") / "tiny-llama"), "llama", stories_dir)


def _lora_model(base_dir: str) -> peft.PeftModel:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # Random (non-zero) B matrices: the adapter changes the logits, so loading it is observable.
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             init_lora_weights=False)
    torch.manual_seed(1)
    return peft.get_peft_model(base, config)


@pytest.fixture(scope="module")
def plain_adapter(base_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An adapter saved by plain peft: adapter_config.json, adapter_model.safetensors, README.md; no tokenizer."""
    out = str(tmp_path_factory.mktemp("plain") / "adapter")
    _lora_model(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def original_adapter(base_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The original project's layout: its adapter_config.json fields and a torch-pickled adapter_model.bin."""
    out = tmp_path_factory.mktemp("original") / "saved-alpaca-tiny"
    out.mkdir()
    torch.save(peft.get_peft_model_state_dict(_lora_model(base_dir)), out / "adapter_model.bin")
    (out / "adapter_config.json").write_text(json.dumps(ORIGINAL_CONFIG, indent=2), encoding="utf-8")
    return str(out)


def _probe_ids() -> torch.Tensor:
    return torch.tensor([[1, 45, 300, 17, 92, 5]])


@torch.inference_mode()
def _reference_logits(base_dir: str, adapter: str) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter).eval()(input_ids=_probe_ids()).logits


@torch.inference_mode()
def test_plain_peft_adapter_loads_with_the_base_from_its_config(base_dir: str, plain_adapter: str) -> None:
    model, tokenizer, template = load_for_inference(plain_adapter, compute_dtype="fp32")
    assert model.base_model.model.name_or_path == base_dir  # adapter_config.json's base_model_name_or_path
    logits = model(input_ids=_probe_ids()).logits
    assert torch.equal(logits, _reference_logits(base_dir, plain_adapter))
    base_logits = transformers.AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=_probe_ids()).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter is applied, not just the base
    assert template.name == "alpaca"  # the llama registry entry's template
    assert tokenizer.padding_side == "left" and tokenizer.name_or_path == base_dir  # the adapter has no tokenizer


@torch.inference_mode()
def test_original_layout_loads_weights_only_with_the_base_passed(base_dir: str, original_adapter: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, template = load_for_inference(original_adapter, model_name_or_path=base_dir, compute_dtype="fp32")
    # The peft-0.2 fields are dropped before peft sees them, so it does not warn about a "higher version"
    # (stock peft does, as loading the reference below shows).
    assert not [w for w in caught if "Unexpected keyword arguments" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = _reference_logits(base_dir, original_adapter)
    assert [w for w in caught if "Unexpected keyword arguments" in str(w.message)]
    assert torch.equal(model(input_ids=_probe_ids()).logits, expected)
    assert model.peft_config["default"].lora_alpha == 16 and model.peft_config["default"].r == 4
    assert template.name == "alpaca"


def test_original_layout_without_its_base_names_the_field(original_adapter: str) -> None:
    with pytest.raises(UserError) as e:
        load_for_inference(original_adapter, compute_dtype="fp32")
    message = str(e.value)
    assert "\n" not in message
    assert "adapter_config.json names the base model '/mnt/bn/qingyi-bn-lq/llama/llama-7b-hf'" in message
    assert "base_model_name_or_path" in message and "pass --model_name_or_path" in message


def test_a_pickle_that_needs_more_than_tensors_is_refused_unrun(base_dir: str, original_adapter: str,
                                                              tmp_path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    evil = tmp_path / "evil"
    shutil.copytree(original_adapter, evil)
    state = torch.load(os.path.join(original_adapter, "adapter_model.bin"), weights_only=True)
    torch.save({**state, "payload": Payload()}, evil / "adapter_model.bin")
    with pytest.raises(UserError) as e:
        load_for_inference(str(evil), model_name_or_path=base_dir, compute_dtype="fp32")
    assert not marker.exists()  # the payload never ran
    message = str(e.value)
    assert "\n" not in message and "adapter_model.bin holds more than tensors (it needs os.makedirs)" in message


def test_fused_lora_of_old_peft_is_refused(base_dir: str, original_adapter: str, tmp_path) -> None:
    old = tmp_path / "fused"
    shutil.copytree(original_adapter, old)
    (old / "adapter_config.json").write_text(json.dumps({**ORIGINAL_CONFIG, "enable_lora": [True, False, True]}))
    with pytest.raises(UserError, match=r"enable_lora \[True, False, True\] is the fused-projection LoRA"):
        load_for_inference(str(old), model_name_or_path=base_dir, compute_dtype="fp32")


def test_folders_that_are_neither_adapter_nor_model_get_one_line(plain_adapter: str, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds neither adapter_config.json .* nor config.json"):
        load_for_inference(str(empty))
    no_base = tmp_path / "no_base"
    shutil.copytree(plain_adapter, no_base)
    config = json.loads((no_base / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(UserError, match="names no base_model_name_or_path; pass --model_name_or_path"):
        load_for_inference(str(no_base))
    (no_base / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": 4,,}')
    with pytest.raises(UserError, match=r"adapter_config.json line 2: not valid JSON"):
        load_for_inference(str(no_base))
    with pytest.raises(UserError, match="Pass --lora_dir .* or --model_name_or_path"):
        load_for_inference()


def test_unreachable_hub_id_says_what_to_pass() -> None:
    # HF_HUB_OFFLINE=1 (conftest) and an empty cache entry: the hub cannot serve it.
    with pytest.raises(UserError) as e:
        load_for_inference("nobody-here/no-such-adapter")
    assert str(e.value) == ("--lora_dir 'nobody-here/no-such-adapter' is neither a local folder nor an adapter the "
                            "Hugging Face hub could serve (offline, or no such repository); pass a local folder "
                            "that holds adapter_config.json and the adapter weights (or a run's output folder).")


def test_model_type_comes_from_the_base_config(stories_dir: str, tmp_path) -> None:
    assert infer_model_type(stories_dir) == "llama"
    assert infer_model_type(write_tiny_model(str(tmp_path / "gpt2"), "gpt2", stories_dir)) == "gpt2"
    qwen3 = tmp_path / "qwen3"
    qwen3.mkdir()
    (qwen3 / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert infer_model_type(str(qwen3)) == "auto"  # no registry entry: the Auto classes
    assert infer_model_type(str(tmp_path / "absent")) == "auto"  # the loader reports it, with what to pass


def test_template_keyword_overrides_the_default_and_the_saved_one(base_dir: str, plain_adapter: str,
                                                                  tmp_path) -> None:
    assert load_for_inference(plain_adapter, compute_dtype="fp32", template="moss")[2].name == "moss"
    run = tmp_path / "run"
    shutil.copytree(plain_adapter, run)
    from alpaca_cot.data.templates import TEMPLATES

    TEMPLATES["moss"].save(str(run))
    assert load_for_inference(str(run), compute_dtype="fp32")[2].name == "moss"  # the saved template.json
    assert load_for_inference(str(run), compute_dtype="fp32", template="alpaca")[2].name == "alpaca"
    with pytest.raises(UserError, match="Unknown --template 'vicuna'; valid choices: alpaca, moss, chat"):
        load_for_inference(plain_adapter, compute_dtype="fp32", template="vicuna")


@torch.inference_mode()
def test_our_saved_arguments_come_before_adapter_config(base_dir: str, plain_adapter: str, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(plain_adapter, run)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/moved/away"}))
    (run / "finetune_args.json").write_text(json.dumps({"model_type": "llama", "model_name_or_path": base_dir,
                                                                   "data": ["alpaca.json"]}))
    model, _, _ = load_for_inference(str(run), compute_dtype="fp32")
    assert torch.equal(model(input_ids=_probe_ids()).logits, _reference_logits(base_dir, plain_adapter))


def _expected_answers(adapter: str, **kwargs) -> list[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        answers = Generator(*load_for_inference(adapter, compute_dtype="fp32", **kwargs)).generate(RECORDS, GREEDY)
    finally:
        torch.set_num_threads(threads)
    assert all(a.strip() for a in answers)  # a script's output can then be told apart from no output
    return answers


@pytest.mark.slow
def test_generate_py_answers_from_a_plain_peft_adapter_on_a_quiet_console(plain_adapter: str) -> None:
    proc = run_script("generate.py", "--lora_dir", plain_adapter, "--instruction", RECORDS[0]["instruction"],
                      "--do_sample", "False", "--max_new_tokens", "8", "--repetition_penalty", "1.0",
                      "--no_repeat_ngram_size", "0", "--compute_dtype", "fp32")
    assert _expected_answers(plain_adapter)[0].strip() in proc.stdout
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr


@pytest.mark.slow
def test_predict_py_runs_the_original_layout(base_dir: str, original_adapter: str, tmp_path) -> None:
    data = tmp_path / "in.json"
    data.write_text(json.dumps([{**r, "output": ""} for r in RECORDS]))
    out = tmp_path / "pred.jsonl"
    proc = run_script("predict.py", "--lora_dir", original_adapter, "--model_name_or_path", base_dir, "--data",
                      str(data), "--result_dir", str(out), "--max_new_tokens", "8", "--compute_dtype", "fp32")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["generate"] for r in rows] == _expected_answers(original_adapter, model_name_or_path=base_dir)
    assert not [n for n in NOISE if n in proc.stderr], proc.stderr


@pytest.mark.slow
def test_server_py_loads_a_hub_id_from_the_cache(plain_adapter: str, tmp_path) -> None:
    # The hub cache layout huggingface_hub reads offline: refs/main names the snapshot folder.
    repo = tmp_path / "hub" / "models--someone--tiny-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(plain_adapter, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import subprocess

    from tests.conftest import PYTHON, ROOT

    proc = subprocess.run([PYTHON, os.path.join(ROOT, "server.py"), "--lora_dir", "someone/tiny-lora",
                           "--do_sample", "False", "--max_new_tokens", "8", "--repetition_penalty", "1.0",
                           "--no_repeat_ngram_size", "0", "--compute_dtype", "fp32"],
                          input=f"{RECORDS[0]['instruction']}\nstop\n", capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _expected_answers(plain_adapter)[0].strip() in proc.stdout


@pytest.mark.slow
def test_merge_of_the_original_layout_equals_the_adapter(base_dir: str, original_adapter: str, tmp_path) -> None:
    out = tmp_path / "merged"
    run_script("merge.py", "--lora_dir", original_adapter, "--model_name_or_path", base_dir, "--merged_dir", str(out))
    report = json.loads((out / "merge.json").read_text())
    assert report["base_model"] == base_dir and report["changed_layers"] == report["updated_layers"] == 4
    assert {"template.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    with torch.inference_mode():
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        expected = _reference_logits(base_dir, original_adapter)
        assert (merged(input_ids=_probe_ids()).logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert _expected_answers(str(out)) == _expected_answers(original_adapter, model_name_or_path=base_dir)


def test_merge_adapter_takes_a_plain_peft_adapter(plain_adapter: str, tmp_path) -> None:
    report = merge_adapter(plain_adapter, str(tmp_path / "merged"), template="moss")
    assert report["lora_dir"] == os.path.abspath(plain_adapter) and report["peft_type"] == "LORA"
    assert json.loads((tmp_path / "merged" / "template.json").read_text())["name"] == "moss"


@pytest.mark.slow
def test_web_py_serves_a_plain_peft_adapter(plain_adapter: str, tmp_path) -> None:
    from tests.test_web import http, serve_web

    with serve_web(plain_adapter, str(tmp_path / "web.log"), "--ui", "False", "--repetition_penalty", "1.0",
                   "--no_repeat_ngram_size", "0", "--compute_dtype", "fp32") as url:
        status, models = http("GET", f"{url}/v1/models")
        status, reply = http("POST", f"{url}/v1/chat/completions", {
            "model": "adapter", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": RECORDS[0]["instruction"]}]})
    assert [m["id"] for m in models["data"]] == ["adapter"]  # the --lora_dir folder's name
    assert status == 200 and reply["choices"][0]["message"]["content"] == _expected_answers(plain_adapter)[0]


@torch.inference_mode()
def test_a_foreign_full_model_folder_loads_as_the_model(base_dir: str) -> None:
    model, tokenizer, template = load_for_inference(base_dir, compute_dtype="fp32")  # no finetune_args.json
    assert not isinstance(model, peft.PeftModel) and model.name_or_path == base_dir
    expected = transformers.AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=_probe_ids()).logits
    assert torch.equal(model(input_ids=_probe_ids()).logits, expected)
    assert template.name == "alpaca" and tokenizer.name_or_path == base_dir
