"""Predict answers for a data file or data name into JSONL, resumably; optionally score them.

Usage:
  python3 predict.py --lora_dir saved_models/RUN --data test.json --result_dir results/ --metrics
  python3 predict.py --model_type chatglm --size 6b --data for_dict_data --lora_dir xxx --result_dir yyy
"""

from __future__ import annotations

from alpaca_cot.cli import as_list, run_cli
from alpaca_cot.errors import UserError
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.io import write_json_atomic
from alpaca_cot.loading import load_for_inference
from alpaca_cot.prediction import PredictionRun, load_inputs, output_paths
from alpaca_cot.scoring import score_predictions


def main(
    # model (defaults come from the run saved in --lora_dir)
    lora_dir: str | None = None,
    model_type: str | None = None,
    model_name_or_path: str | None = None,
    size: str | None = None,
    compute_dtype: str = "auto",
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    # data
    data: str | list[str] | None = None,
    max_samples: int | None = None,
    # decoding: greedy by default, as the seed's predict.py (reproducible scores)
    predict_batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    num_beams: int = 1,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    # output
    result_dir: str = "saved_result.jsonl",
    metrics: bool = False,
    overwrite: bool = False,
) -> None:
    """Predict every record of --data (dataset names or unified-format JSON/JSONL files).

    Writes each input record plus a "generate" field as JSONL. --result_dir is the predictions file
    when it ends in .jsonl/.json/.txt, else a folder that gets predictions.jsonl. A rerun continues
    where a killed run stopped; --overwrite starts again. --metrics writes exact-match accuracy
    (references with a final answer: "the answer is N", "#### N", an option letter) and ROUGE-L
    (other references) as JSON beside the predictions.
    """
    sources = as_list(data)
    if not sources:
        raise UserError("Pass --data: a dataset name from data/registry.json or one or more file paths.")
    if int(predict_batch_size) < 1:
        raise UserError("--predict_batch_size must be at least 1")
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                            top_k=top_k, num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
                            repetition_penalty=repetition_penalty, seed=seed)
    records = load_inputs(sources, int(max_samples) if max_samples else None)
    predictions_path, metrics_path = output_paths(str(result_dir))
    run = PredictionRun(records, str(result_dir), sources=sources, overwrite=overwrite)
    if run.todo:
        print(f"{len(records) - len(run.todo)} of {len(records)} records are already in {predictions_path}; "
              f"predicting {len(run.todo)}", flush=True)
        generator = Generator(*load_for_inference(
            lora_dir, model_type=model_type, model_name_or_path=model_name_or_path, size=size,
            compute_dtype=compute_dtype, quantization_bit=quantization_bit, trust_remote_code=trust_remote_code))
        rate = run.predict(generator, params, int(predict_batch_size))
        print(f"{rate:.2f} records/s at batch size {predict_batch_size}")
    else:
        print(f"All {len(records)} records are already predicted in {predictions_path}; "
              "pass --overwrite to predict them again.")
    predicted = run.finish()
    print(f"Predictions: {predictions_path}")
    if metrics:
        summary = score_predictions(predicted)
        write_json_atomic(metrics_path, summary)
        print(f"Metrics: {metrics_path}: {summary}")


if __name__ == "__main__":
    run_cli(main)
