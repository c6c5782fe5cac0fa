"""Chat with a fine-tuned model in the terminal: multi-turn history, streamed answers.

Usage:
  python3 server.py --lora_dir saved_models/RUN
  python3 server.py --model_type chatglm --size 6b --lora_dir xxx

Type 'clear' to empty the history and 'stop' (or Ctrl-D) to quit; Ctrl-C stops an answer.
"""

from __future__ import annotations

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import ChatArgs, ModelArgs
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference
from alpaca_cot.serving.chat import ChatSession, chat_loop


@command(ModelArgs, SamplingParams, ChatArgs)
def main(model: ModelArgs, sampling: SamplingParams, args: ChatArgs) -> None:
    """Chat with the model of --lora_dir (an output folder of uniform_finetune.py or any adapter).

    The history is kept as long as the prompt plus --max_new_tokens fits --context_window tokens
    (default: the model's own); the oldest exchanges are dropped first. --system sets a system
    message. --size picks the registry's checkpoint only when no base model is known.
    """
    generator = Generator(*load_for_inference(**model.loader_kwargs()))
    chat_loop(ChatSession(generator, sampling, context_window=args.context_window, system=args.system))


if __name__ == "__main__":
    run_cli(main)
