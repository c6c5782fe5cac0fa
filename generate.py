"""Answer instructions with a fine-tuned model, streaming the response to the terminal.

Usage:
  python3 generate.py --lora_dir saved_models/RUN                  # interactive, as the original
  python3 generate.py --lora_dir saved_models/RUN --instruction "Tell me about alpacas." [--input "..."]
  python3 generate.py --data alpaca-belle-cot --model_type llama   # the newest run under saved_models/ on that data
"""

from __future__ import annotations

from contextlib import closing

from alpaca_cot.chat import answer_loop, print_stream
from alpaca_cot.cli import run_cli
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.loading import load_for_inference
from alpaca_cot.runs import find_run


def main(
    # model (defaults come from the run saved in --lora_dir)
    lora_dir: str | None = None,
    data: str | None = None,
    model_type: str | None = None,
    model_name_or_path: str | None = None,
    size: str | None = None,
    compute_dtype: str = "auto",
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    # input: one instruction, or an interactive loop when absent
    instruction: str | None = None,
    input: str = "",  # shadows the builtin: the flag is --input, as the record field
    # decoding: the original's documented sampling settings
    max_new_tokens: int = 256,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    num_beams: int = 1,
    no_repeat_ngram_size: int = 6,
    repetition_penalty: float = 1.8,
    seed: int | None = None,
) -> None:
    """Stream answers from the model of --lora_dir (an output folder of uniform_finetune.py).

    Without --lora_dir, --data picks the newest run under saved_models/ trained on that data (the
    seed's usage), and --model_name_or_path (or --model_type with --size) runs a base model alone.
    With --instruction (and optionally --input) one answer is printed; otherwise instructions are
    read from the terminal until Ctrl-D. --do_sample False decodes greedily.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                            top_k=top_k, num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
                            repetition_penalty=repetition_penalty, seed=seed)
    if lora_dir is None and data is not None and model_name_or_path is None:
        lora_dir = find_run(data)
        print(f"Using the run in {lora_dir}", flush=True)
    generator = Generator(*load_for_inference(
        lora_dir, model_type=model_type, model_name_or_path=model_name_or_path, size=size,
        compute_dtype=compute_dtype, quantization_bit=quantization_bit, trust_remote_code=trust_remote_code))
    if instruction is None:
        answer_loop(generator, params)
        return
    with closing(generator.stream({"instruction": str(instruction), "input": str(input or "")}, params)) as pieces:
        print_stream(pieces)


if __name__ == "__main__":
    run_cli(main)
