"""Serve a fine-tuned model on the web: the original API, an OpenAI-compatible API and a chat page.

Usage:
  python3 web.py --lora_dir OUTPUT_DIR [--port 8410] [--api_key KEY]
  python3 web.py --model_type chatglm --size 6b --lora_dir xxx        (the original's command)

Then open http://127.0.0.1:8410/ (the chat page), or point an OpenAI client at http://127.0.0.1:8410/v1,
or POST {"prompt": "..."} to http://127.0.0.1:8410/ for {"response", "status", "time"}.
"""

from __future__ import annotations

import os

from alpaca_cot.cli import run_cli
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.loading import load_for_inference


def main(
    # model
    lora_dir: str | None = None,
    model_type: str | None = None,
    model_name_or_path: str | None = None,
    size: str | None = None,
    compute_dtype: str = "auto",
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    # sampling defaults (requests and the page's sliders override them)
    max_new_tokens: int = 256,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    no_repeat_ngram_size: int = 6,
    repetition_penalty: float = 1.8,
    # server
    host: str = "127.0.0.1",
    port: int = 8410,
    api_key: str | None = None,
    ui: bool = True,
) -> None:
    """Serve the model of --lora_dir (an output folder of uniform_finetune.py) over HTTP.

    The run's saved arguments give the base model, type and template; --model_type and
    --model_name_or_path override them; --size picks the registry's checkpoint when no base model
    is known. --api_key (or the ALPACA_COT_API_KEY environment variable) makes the API require
    'Authorization: Bearer KEY' and the chat page a login with the key as password. --host 0.0.0.0
    serves other machines too. --ui False serves the API alone.
    """
    import uvicorn

    from alpaca_cot.webapp import create_app

    api_key = api_key or os.environ.get("ALPACA_COT_API_KEY") or None
    model, tokenizer, template = load_for_inference(
        lora_dir, model_type=model_type, model_name_or_path=model_name_or_path, size=size,
        compute_dtype=compute_dtype, quantization_bit=quantization_bit, trust_remote_code=trust_remote_code)
    defaults = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_p=top_p, top_k=top_k, no_repeat_ngram_size=no_repeat_ngram_size,
                              repetition_penalty=repetition_penalty)
    model_id = os.path.basename(os.path.normpath(lora_dir or model.name_or_path))
    app = create_app(Generator(model, tokenizer, template), defaults, model_id=model_id, api_key=api_key, ui=ui)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api_key: anyone who can reach this port can use the model")
    url = f"http://{host}:{port}"
    page = f"chat page {url}/, " if ui else ""
    print(f"Serving {model_id}: {page}OpenAI API {url}/v1, original API POST {url}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
