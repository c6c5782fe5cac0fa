"""Serve a fine-tuned model on the web: the original API, an OpenAI-compatible API and a chat page.

Usage:
  python3 web.py --lora_dir OUTPUT_DIR [--port 8410] [--api_key KEY]
  python3 web.py --model_type chatglm --size 6b --lora_dir xxx        (the original's command)

Then open http://127.0.0.1:8410/ (the chat page), or point an OpenAI client at http://127.0.0.1:8410/v1,
or POST {"prompt": "..."} to http://127.0.0.1:8410/ for {"response", "status", "time"}.
"""

from __future__ import annotations

import os
import socket

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import ModelArgs, ServeArgs
from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference


@command(ModelArgs, SamplingParams, ServeArgs)
def main(model: ModelArgs, sampling: SamplingParams, args: ServeArgs) -> None:
    """Serve the model of --lora_dir (an output folder of uniform_finetune.py or any adapter) over HTTP.

    The sampling flags are the defaults that requests and the page's sliders override.
    --api_key (or the ALPACA_COT_API_KEY environment variable) makes the API require
    'Authorization: Bearer KEY' and the chat page a login with the key as password.
    """
    import uvicorn

    from alpaca_cot.serving.webapp import create_app

    api_key = args.api_key or os.environ.get("ALPACA_COT_API_KEY") or None
    listener = listen(args.host, args.port)
    base, tokenizer, template = load_for_inference(**model.loader_kwargs())
    model_id = os.path.basename(os.path.normpath(model.lora_dir or base.name_or_path))
    app = create_app(Generator(base, tokenizer, template), sampling, model_id=model_id, api_key=api_key, ui=args.ui,
                     max_batch_size=args.max_batch_size, max_request_bytes=args.max_request_bytes)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without --api_key: anyone who can reach this port can use the model")
    url = f"http://{args.host}:{listener.getsockname()[1]}"
    page = f"chat page {url}/, " if args.ui else ""
    print(f"Serving {model_id}: {page}OpenAI API {url}/v1, original API POST {url}/", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, listening before the model loads: an address in use is refused at once, and nothing
    can take the port while the model loads (port 0: a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)  # SO_REUSEADDR, as uvicorn's own bind
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None


if __name__ == "__main__":
    run_cli(main)
