"""Answer instructions with a fine-tuned model, streaming the response to the terminal.

Usage:
  python3 generate.py --lora_dir saved_models/RUN                  # interactive, as the original
  python3 generate.py --lora_dir saved_models/RUN --instruction "Tell me about alpacas." [--input "..."]
  python3 generate.py --data alpaca-belle-cot --model_type llama   # the newest run under saved_models/ on that data
"""

from __future__ import annotations

from contextlib import closing

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import GenerateArgs, ModelArgs
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference
from alpaca_cot.runs import find_run
from alpaca_cot.serving.chat import answer_loop, print_stream


@command(ModelArgs, SamplingParams, GenerateArgs)
def main(model: ModelArgs, sampling: SamplingParams, args: GenerateArgs) -> None:
    """Stream answers from the model of --lora_dir (an output folder of uniform_finetune.py or any adapter).

    Without --lora_dir, --data picks the newest run under saved_models/ trained on that data (the
    seed's usage), and --model_name_or_path (or --model_type with --size) runs a base model alone.
    With --instruction (and optionally --input) one answer is printed; otherwise instructions are
    read from the terminal until Ctrl-D. --do_sample False decodes greedily.
    """
    if model.lora_dir is None and args.data is not None and model.model_name_or_path is None:
        model.lora_dir = find_run(args.data)
        print(f"Using the run in {model.lora_dir}", flush=True)
    generator = Generator(*load_for_inference(**model.loader_kwargs()))
    if args.instruction is None:
        answer_loop(generator, sampling)
        return
    with closing(generator.stream({"instruction": args.instruction, "input": args.input}, sampling)) as pieces:
        print_stream(pieces)


if __name__ == "__main__":
    run_cli(main)
