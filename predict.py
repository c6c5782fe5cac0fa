"""Predict answers for a data file or data name into JSONL, resumably; optionally score them.

Usage:
  python3 predict.py --lora_dir saved_models/RUN --data test.json --result_dir results/ --metrics
  python3 predict.py --model_type chatglm --size 6b --data for_dict_data --lora_dir xxx --result_dir yyy
"""

from __future__ import annotations

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import ModelArgs, PredictArgs
from alpaca_cot.evaluation.answers import score_predictions
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.io import write_json_atomic
from alpaca_cot.models.loading import load_for_inference
from alpaca_cot.prediction import PredictionRun, load_inputs, output_paths


# Greedy by default, as the seed's predict.py: reproducible scores.
@command(ModelArgs, SamplingParams, PredictArgs,
         defaults={"do_sample": False, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0})
def main(model: ModelArgs, sampling: SamplingParams, args: PredictArgs) -> None:
    """Predict every record of --data (dataset names or unified-format JSON/JSONL files).

    Writes each input record plus a "generate" field as JSONL. --result_dir is the predictions file
    when it ends in .jsonl/.json/.txt, else a folder that gets predictions.jsonl. A rerun continues
    where a killed run stopped; --overwrite starts again. --metrics scores references with a final
    answer ("the answer is N", "#### N", an option letter) as evaluate.py does (exact match, flexible
    accuracy, the share that state an answer) and other references by ROUGE-L, as JSON beside them.
    """
    records = load_inputs(args.data, args.max_samples)
    predictions_path, metrics_path = output_paths(args.result_dir)
    run = PredictionRun(records, args.result_dir, sources=args.data, overwrite=args.overwrite,
                        models={"--lora_dir": [model.lora_dir], "--model_name_or_path": [model.model_name_or_path]})
    if run.todo:
        print(f"{len(records) - len(run.todo)} of {len(records)} records are already in {predictions_path}; "
              f"predicting {len(run.todo)}", flush=True)
        generator = Generator(*load_for_inference(**model.loader_kwargs()))
        rate = run.predict(generator, sampling, args.predict_batch_size)
        print(f"{rate:.2f} records/s at batch size {args.predict_batch_size}")
    else:
        print(f"All {len(records)} records are already predicted in {predictions_path}; "
              "pass --overwrite to predict them again.")
    predicted = run.finish()
    print(f"Predictions: {predictions_path}")
    if args.metrics:
        summary = score_predictions(predicted)
        write_json_atomic(metrics_path, summary)
        print(f"Metrics: {metrics_path}: {summary}")


if __name__ == "__main__":
    run_cli(main)
