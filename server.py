"""Chat with a fine-tuned model in the terminal: multi-turn history, streamed answers.

Usage:
  python3 server.py --lora_dir saved_models/RUN
  python3 server.py --model_type chatglm --size 6b --lora_dir xxx
Type 'clear' to empty the history and 'stop' (or Ctrl-D) to quit; Ctrl-C stops an answer.
"""

from __future__ import annotations

from alpaca_cot.chat import ChatSession, chat_loop
from alpaca_cot.cli import run_cli
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.loading import load_for_inference


def main(
    # model (defaults come from the run saved in --lora_dir)
    lora_dir: str | None = None,
    model_type: str | None = None,
    model_name_or_path: str | None = None,
    size: str | None = None,
    compute_dtype: str = "auto",
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    # conversation
    system: str | None = None,
    context_window: int | None = None,
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
    """Chat with the model of --lora_dir (an output folder of uniform_finetune.py), any model type.

    The history is kept as long as the prompt plus --max_new_tokens fits --context_window tokens
    (default: the model's own); the oldest exchanges are dropped first. --system sets a system
    message. --size picks the registry's checkpoint only when no base model is known.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                            top_k=top_k, num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
                            repetition_penalty=repetition_penalty, seed=seed)
    generator = Generator(*load_for_inference(
        lora_dir, model_type=model_type, model_name_or_path=model_name_or_path, size=size,
        compute_dtype=compute_dtype, quantization_bit=quantization_bit, trust_remote_code=trust_remote_code))
    chat_loop(ChatSession(generator, params, context_window=context_window, system=system))


if __name__ == "__main__":
    run_cli(main)
