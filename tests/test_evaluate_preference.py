"""evaluate.py on preference pairs (issue 23, item 3): reply log-probabilities equal a plain forward pass, the
reference is the base with the adapter disabled, accuracies carry Wilson intervals and count ties as wrong,
each --data entry is scored by its kind, and KTO files or mixed entries are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess

import peft
import pytest
import torch

from alpaca_cot.data.records import DataError
from alpaca_cot.evaluation.preference import SIDES, data_kind, score_pairs, summarize
from alpaca_cot.evaluation.stats import wilson_interval
from alpaca_cot.models.loading import load_for_inference
from tests.conftest import PYTHON, ROOT, run_script

USER = {"role": "user", "content": "Name a colour."}
PAIRS = [{"messages": [USER], "chosen": "Blue, like the sky.", "rejected": "I will not."},
         {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "2 + 3 = 5.", "rejected": "7"},
         {"messages": [USER, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
          "chosen": "Red.", "rejected": "No, one colour is enough for anybody who asks me."}]


def _write(path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@torch.inference_mode()
def _by_hand(model, tokenizer, template, record: dict, side: str) -> float:
    """The summed log-probability of one reply from one unbatched forward pass over prompt + reply."""
    from alpaca_cot.data.pairs import encode_pair

    encoded = encode_pair(record, template, tokenizer, 256)
    prompt, reply = encoded["prompt_ids"], encoded[f"{side}_ids"]
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + reply])).logits[0].double(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(reply))


def test_reply_logps_equal_a_plain_forward_pass_and_the_reference_is_the_base(tiny_model_dir: str) -> None:
    model, tokenizer, template = load_for_inference(model_name_or_path=tiny_model_dir, compute_dtype="fp32")
    base_rows = score_pairs(model, tokenizer, template, PAIRS, 256, 2)
    for record, row in zip(PAIRS, base_rows, strict=True):
        for side in SIDES:
            assert row[f"{side}_logp"] == pytest.approx(_by_hand(model, tokenizer, template, record, side), abs=1e-4)
            assert row[f"ref_{side}_logp"] is None  # no adapter: the policy is the reference
    for row, alone in zip(base_rows, score_pairs(model, tokenizer, template, PAIRS, 256, 1), strict=True):
        assert [row[f"{side}_logp"] for side in SIDES] == pytest.approx([alone[f"{s}_logp"] for s in SIDES], abs=1e-4)
    base_summary = summarize(base_rows, None)
    assert base_summary["reward_accuracy"] is None and "ref_logp_accuracy" not in base_summary

    torch.manual_seed(0)  # random B matrices: the adapter changes the log-probabilities
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(model, config).eval()
    rows = score_pairs(adapted, tokenizer, template, PAIRS, 256, 3)
    for record, row, base in zip(PAIRS, rows, base_rows, strict=True):
        for side in SIDES:
            assert row[f"ref_{side}_logp"] == pytest.approx(base[f"{side}_logp"], abs=1e-4)
            assert row[f"{side}_logp"] == pytest.approx(_by_hand(adapted, tokenizer, template, record, side), abs=1e-4)
            assert abs(row[f"{side}_logp"] - base[f"{side}_logp"]) > 1e-3


def _row(chosen: float, rejected: float, ref: tuple[float, float] | None, tokens: tuple[int, int] = (1, 1)) -> dict:
    return {"chosen_logp": chosen, "rejected_logp": rejected, "ref_chosen_logp": ref[0] if ref else None,
            "ref_rejected_logp": ref[1] if ref else None, "chosen_tokens": tokens[0], "rejected_tokens": tokens[1],
            "truncated": False}


def test_accuracies_count_ties_as_wrong_and_carry_wilson_intervals() -> None:
    rows = [_row(-1.0, -3.0, (-2.0, -2.0)),  # margin +2: right
            _row(-2.0, -2.0, (-1.0, -1.0)),  # margin 0: a tie, wrong; chosen == rejected: a tie, wrong
            _row(-5.0, -4.0, (-5.0, -6.0)),  # margin -2: wrong; rejected more likely
            _row(-6.0, -3.0, (-6.5, -3.0), (6, 2))]  # margin +0.5: right; per token -1.0 > -1.5: right
    result = summarize(rows, 0.1)
    assert result["reward_accuracy"]["correct"] == 2 and result["reward_accuracy"]["records"] == 4
    assert tuple(result["reward_accuracy"]["ci95"]) == pytest.approx(wilson_interval(2, 4))
    assert result["reward_margin"] == pytest.approx((2 + 0 - 2 + 0.5) / 4)
    assert result["beta_reward_margin"] == pytest.approx(0.1 * result["reward_margin"])
    assert result["logp_accuracy"]["correct"] == 1 and result["logp_accuracy_per_token"]["correct"] == 2
    assert result["chosen_logp"] == pytest.approx(-3.5) and result["rejected_logp"] == pytest.approx(-3.0)
    assert summarize(rows, None)["beta_reward_margin"] is None
    assert result["ref_logp_accuracy"]["correct"] == 1  # -2 > -2 no (a tie), -1 > -1 no, -5 > -6 yes, -6.5 > -3 no
    assert result["ref_logp_accuracy_per_token"]["correct"] == 2  # and -6.5 / 6 > -3 / 2
    assert result["ref_chosen_logp"] == pytest.approx(-3.625) and result["ref_rejected_logp"] == pytest.approx(-3.0)


def test_each_data_entry_is_scored_by_its_kind(tmp_path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", PAIRS)
    sft = _write(tmp_path / "sft.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    kto = _write(tmp_path / "kto.jsonl", [{"messages": [USER], "output": "Blue.", "label": True}])
    assert (data_kind(pairs), data_kind(sft)) == ("pairs", "sft")
    with pytest.raises(DataError, match=r"kto.jsonl: KTO records .* cannot be ranked"):
        data_kind(kto)
    both = tmp_path / "both"
    both.mkdir()
    for path in (pairs, sft):
        os.link(path, both / os.path.basename(path))
    with pytest.raises(DataError, match="holds both SFT records and preference pairs"):
        data_kind(str(both))


@pytest.mark.slow
def test_evaluate_py_scores_pairs_and_sft_records_in_one_run(trained_adapter: str, tmp_path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", PAIRS)
    sft = _write(tmp_path / "sft.jsonl", [{"instruction": "Is snow cold?", "output": "So the answer is yes."}])
    out = tmp_path / "eval"
    args = ("--lora_dir", trained_adapter, "--data", f"{pairs},{sft}", "--output_dir", str(out), "--compute_dtype",
            "fp32", "--max_new_tokens", "8")
    first = run_script("evaluate.py", *args)
    results = json.loads((out / "results.json").read_text())
    r = results["data"]["pairs"]
    assert r["kind"] == "pairs" and r["pairs"] == 3 and r["reward_accuracy"]["records"] == 3
    assert r["beta"] is None  # an SFT run: no beta scales the margin
    assert results["data"]["sft"]["records"] == 1 and "accuracy" in results["data"]["sft"]
    rows = [json.loads(line) for line in (out / r["scores"]).read_text().splitlines()]
    assert sum((x["chosen_logp"] - x["ref_chosen_logp"]) - (x["rejected_logp"] - x["ref_rejected_logp"]) > 0
               for x in rows) == r["reward_accuracy"]["correct"]
    table = (out / "results.md").read_text()
    assert "| pairs | 3 |" in table and "| sft | 1 |" in table and table in first.stdout
    again = run_script("evaluate.py", *args)  # the same settings: the scores are read back, no model is loaded
    assert "scoring" not in again.stdout and "Loading weights" not in again.stderr
    assert json.loads((out / "results.json").read_text())["data"]["pairs"] == r

    kto = _write(tmp_path / "kto.jsonl", [{"messages": [USER], "output": "Blue.", "label": True}])
    proc = run_script("evaluate.py", "--lora_dir", trained_adapter, "--data", kto, "--output_dir",
                      str(tmp_path / "refused"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "KTO records" in proc.stderr
    assert not (tmp_path / "refused").exists()


def synthetic_pairs(n: int) -> list[dict]:
    """Pairs from the synthetic single-turn records: the record's own answer is chosen, the next one's rejected."""
    from tests.fixtures.synthetic import synthetic_records

    records = [r for r in synthetic_records(4 * n, seed=1, chats=0) if "instruction" in r]
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": other["output"]}
            for r, other in zip(records[:n], records[1:n + 1], strict=True) if r["output"] != other["output"]]


@pytest.fixture(scope="module")
def dpo_run(trained_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(a DPO adapter trained by uniform_finetune.py --stage dpo from the SFT adapter, its pairs file)."""
    folder = tmp_path_factory.mktemp("dpo")
    pairs = _write(folder / "pairs.jsonl", synthetic_pairs(16))
    run_script("uniform_finetune.py", "--stage", "dpo", "--lora_dir", trained_adapter, "--data", pairs,
               "--val_set_size", "0", "--epochs", "1", "--per_gpu_train_batch_size", "4", "--learning_rate", "1e-2",
               "--pref_beta", "0.2", "--compute_dtype", "fp32", "--output_dir", str(folder / "run"))
    return str(folder / "run"), pairs


@pytest.mark.slow
def test_a_dpo_run_is_scored_against_its_starting_adapter_with_its_beta(dpo_run: tuple[str, str],
                                                                         trained_adapter: str, tmp_path) -> None:
    from alpaca_cot.config import EvaluateArgs, ModelArgs
    from alpaca_cot.evaluation.run import run_evaluation
    from alpaca_cot.generation.sampling import SamplingParams

    adapter, pairs = dpo_run
    r = run_evaluation(ModelArgs(lora_dir=adapter, compute_dtype="fp32"), SamplingParams(),
                       EvaluateArgs(data=[pairs], output_dir=str(tmp_path / "dpo")))["data"]["pairs"]
    assert r["beta"] == 0.2 and r["reference"] == trained_adapter
    assert r["beta_reward_margin"] == pytest.approx(0.2 * r["reward_margin"])
    sft = run_evaluation(ModelArgs(lora_dir=trained_adapter, compute_dtype="fp32"), SamplingParams(),
                         EvaluateArgs(data=[pairs], output_dir=str(tmp_path / "sft")))["data"]["pairs"]
    rows = [json.loads(line) for line in (tmp_path / "dpo" / r["scores"]).read_text().splitlines()]
    sft_rows = [json.loads(line) for line in (tmp_path / "sft" / sft["scores"]).read_text().splitlines()]
    for row, before in zip(rows, sft_rows, strict=True):  # the reference is the SFT adapter, as in training
        for side in SIDES:
            assert row[f"ref_{side}_logp"] == pytest.approx(before[f"{side}_logp"], abs=1e-4)
    assert r["reward_margin"] > 0  # trained on these pairs at a high rate: it prefers the chosen replies


@pytest.mark.slow
def test_a_dpo_adapter_loads_in_plain_peft_and_every_script(dpo_run: tuple[str, str], tiny_lm_dir: str,
                                                            trained_adapter: str, tmp_path) -> None:
    import transformers

    from alpaca_cot.generation.generator import Generator
    from alpaca_cot.generation.sampling import SamplingParams
    from tests.test_web import http, serve_web

    adapter, _ = dpo_run
    probe = torch.tensor([[1, 45, 300, 17, 92, 5]])
    with torch.inference_mode():
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
        plain = peft.PeftModel.from_pretrained(base, adapter).eval()(input_ids=probe).logits
        ours = load_for_inference(adapter, compute_dtype="fp32")[0](input_ids=probe).logits
        sft = load_for_inference(trained_adapter, compute_dtype="fp32")[0](input_ids=probe).logits
    assert torch.allclose(plain, ours, atol=1e-5) and not torch.allclose(ours, sft, atol=1e-3)  # DPO changed it
    greedy = ("--do_sample", "False", "--max_new_tokens", "8", "--repetition_penalty", "1.0",
              "--no_repeat_ngram_size", "0", "--compute_dtype", "fp32")
    question = "Add the two numbers."
    sampling = SamplingParams(do_sample=False, max_new_tokens=8, repetition_penalty=1.0, no_repeat_ngram_size=0)
    expected = Generator(*load_for_inference(adapter, compute_dtype="fp32")).generate(
        [{"instruction": question, "input": ""}], sampling)[0]
    assert expected.strip()
    assert expected.strip() in run_script("generate.py", "--lora_dir", adapter, "--instruction", question,
                                          *greedy).stdout
    data = _write(tmp_path / "in.jsonl", [{"instruction": question, "input": ""}])
    run_script("predict.py", "--lora_dir", adapter, "--data", data, "--result_dir", str(tmp_path / "pred.jsonl"),
               *greedy)
    assert json.loads((tmp_path / "pred.jsonl").read_text())["generate"] == expected
    chat = subprocess.run([PYTHON, os.path.join(ROOT, "server.py"), "--lora_dir", adapter, *greedy],
                          input=f"{question}\nstop\n", capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert chat.returncode == 0 and expected.strip() in chat.stdout, chat.stderr[-2000:]
    run_script("merge.py", "--lora_dir", adapter, "--merged_dir", str(tmp_path / "merged"))
    with torch.inference_mode():
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
        assert (merged(input_ids=probe).logits - ours).abs().max() <= 1e-5 * ours.abs().max()
    with serve_web(adapter, str(tmp_path / "web.log"), "--ui", "False", *greedy[2:]) as url:
        status, reply = http("POST", f"{url}/v1/chat/completions", {
            "model": "run", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": question}]})
    assert status == 200 and reply["choices"][0]["message"]["content"] == expected


def test_the_dpo_demo_holds_out_pairs_first_and_reports_its_reference_as_before(tmp_path, capsys) -> None:
    from alpaca_cot.evaluation.stats import percent
    from tests.test_predict import load_script

    demo = load_script("scripts/demo_dpo_data.py")
    rows = [{"instruction": f"Question {i}?", "chosen": "Yes." * (1 + i % 3), "rejected": f"No {i}."}
            for i in range(30)]
    pairs = _write(tmp_path / "pairs.jsonl", [*rows, {"instruction": "long " * 100, "chosen": "a", "rejected": "b"}])
    for out in ("a", "b"):
        demo.split(pairs, str(tmp_path / out), heldout=10, max_chars=100, seed=0)

    def questions(path) -> list[str]:
        return [json.loads(line)["instruction"] for line in path.read_text().splitlines()]

    held, pool = questions(tmp_path / "a" / "heldout.jsonl"), questions(tmp_path / "a" / "pool.jsonl")
    assert held == questions(tmp_path / "b" / "heldout.jsonl") and held != [r["instruction"] for r in rows[:10]]
    assert sorted(held + pool) == sorted(r["instruction"] for r in rows)  # the long pair is left out, nothing twice

    result = summarize([_row(-1.0, -3.0, (-2.0, -2.5)), _row(-4.0, -3.0, (-4.0, -4.5))], 0.1)  # before 2/2, after 1/2
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"data": {"heldout": {"kind": "pairs", **result}}}))
    demo.report(str(tmp_path / "eval"))
    before, after = capsys.readouterr().out.splitlines()[-2:]
    assert before.startswith("| before: base model") and percent(result["ref_logp_accuracy"]) in before
    assert percent(result["logp_accuracy"]) not in before and "n/a (no adapter)" in before
    assert after.startswith("| after: DPO adapter") and percent(result["reward_accuracy"]) in after
