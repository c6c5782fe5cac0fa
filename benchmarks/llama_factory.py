"""LLaMA-Factory from PyPI in its own virtualenv, run on the speed workload.

Usage:
  .venv/bin/python benchmarks/llama_factory.py [--n_records 200] [--variants default,neat_packing] [--bf16]

The install follows what was measured to work with a CPU torch (a plain ``pip install llamafactory``
pulls a CUDA torch through torchvision/torchaudio): the CPU torch pin first, then LLaMA-Factory's
requirements minus torchvision and torchaudio with torch still pinned, then its wheel with
``--no-deps``. LLaMA-Factory imports torchaudio unconditionally (``data/mm_plugin.py``), and the
real one does not load beside torch 2.13 CPU, so a stand-in ``torchaudio`` module goes on the path
for these text-only runs. The install is done once under ``benchmarks/.cache/lf-venv``; its log is
``benchmarks/.cache/lf-install.log``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from workload import DEFAULT_CACHE, Workload, build_workload  # noqa: E402

LF_VERSION = "0.9.5"
TORCH_PIN = "torch==2.13.0"
LEFT_OUT = ("torch", "torchvision", "torchaudio")  # torch is pinned instead; the other two pull CUDA builds
VARIANTS = ("default", "neat_packing")
TORCHAUDIO_STANDIN = '''"""Stand-in for torchaudio: LLaMA-Factory imports it; text-only runs never call it."""


def load(*args, **kwargs):
    raise ImportError("torchaudio is a stand-in in this benchmark virtualenv (text-only runs)")


class functional:  # noqa: N801 - mirrors torchaudio.functional
    resample = staticmethod(load)
'''


def venv_python(cache_dir: str = DEFAULT_CACHE) -> str:
    """The interpreter of LLaMA-Factory's virtualenv."""
    return os.path.join(cache_dir, "lf-venv", "bin", "python")


def standin_dir(cache_dir: str = DEFAULT_CACHE) -> str:
    """The folder that holds the stand-in ``torchaudio`` package (put it on PYTHONPATH)."""
    return os.path.join(cache_dir, "lf-standins")


def _requirements(wheel: str) -> list[str]:
    """The wheel's Requires-Dist lines without torch, torchvision and torchaudio."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    reqs = [r for r in reqs if "extra ==" not in r]
    return [r for r in reqs if r.split(";")[0].replace(">", "=").replace("<", "=").replace("!", "=")
            .split("=")[0].strip().lower() not in LEFT_OUT]


def install(cache_dir: str = DEFAULT_CACHE) -> str | None:
    """Install LLaMA-Factory once into ``cache_dir/lf-venv``; None when it works, else one sentence why not."""
    marker = os.path.join(cache_dir, "lf-venv", f".installed-{LF_VERSION}")
    if os.path.isfile(marker):
        return None
    log_path = os.path.join(cache_dir, "lf-install.log")
    os.makedirs(cache_dir, exist_ok=True)
    python, pip = venv_python(cache_dir), [venv_python(cache_dir), "-m", "pip", "install", "-q"]
    wheels = os.path.join(cache_dir, "lf-wheel")
    with open(log_path, "w", encoding="utf-8") as log:
        def step(what: str, cmd: list[str]) -> str | None:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            return None if rc == 0 else f"LLaMA-Factory install failed at '{what}' (exit {rc}); see {log_path}."

        error = (step("create virtualenv", [sys.executable, "-m", "venv", "--clear", os.path.dirname(
                     os.path.dirname(python))])
                 or step("pin CPU torch", [*pip, TORCH_PIN])
                 or step("download wheel", [python, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels,
                                            f"llamafactory=={LF_VERSION}"]))
        if error:
            return error
        wheel = glob.glob(os.path.join(wheels, f"llamafactory-{LF_VERSION}-*.whl"))[0]
        reqs = os.path.join(cache_dir, "lf-requirements.txt")
        with open(reqs, "w", encoding="utf-8") as f:
            f.write("\n".join(_requirements(wheel)) + "\n")
        error = (step("install requirements (minus torchvision, torchaudio)", [*pip, "-r", reqs, TORCH_PIN])
                 or step("install wheel --no-deps", [*pip, "--no-deps", wheel]))
        if error:
            return error
        os.makedirs(os.path.join(standin_dir(cache_dir), "torchaudio"), exist_ok=True)
        with open(os.path.join(standin_dir(cache_dir), "torchaudio", "__init__.py"), "w", encoding="utf-8") as f:
            f.write(TORCHAUDIO_STANDIN)
        log.write("$ import check\n")
        log.flush()
        rc = subprocess.call([python, "-c", "import llamafactory.train.tuner"], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **driver_env(cache_dir)})
        if rc != 0:
            return f"LLaMA-Factory installed but 'import llamafactory.train.tuner' fails (exit {rc}); see {log_path}."
    with open(marker, "w", encoding="utf-8") as f:
        f.write(TORCH_PIN + "\n")
    return None


def driver_env(cache_dir: str = DEFAULT_CACHE, threads: int = 2) -> dict[str, str]:
    """What a run adds to the environment: the stand-in on the path, offline, caches in ``cache_dir``, threads."""
    return {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": standin_dir(cache_dir), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": os.path.join(cache_dir, "hf-datasets"), "DISABLE_VERSION_CHECK": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def build_args(workload: Workload, output_dir: str, variant: str = "default", bf16: bool = False,
               threads: int = 2) -> dict:
    """LLaMA-Factory's training arguments (its YAML keys) for the workload; registers the data file."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown LLaMA-Factory variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
    data_dir = os.path.dirname(workload.data_file)
    dataset = os.path.splitext(os.path.basename(workload.data_file))[0]
    with open(os.path.join(data_dir, "dataset_info.json"), "w", encoding="utf-8") as f:
        json.dump({dataset: {"file_name": os.path.basename(workload.data_file)}}, f, indent=2)
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": workload.model_dir, "template": "alpaca",
        "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target": "q_proj,v_proj",
        "dataset": dataset, "dataset_dir": data_dir, "cutoff_len": 512, "overwrite_cache": True,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 3e-4,
        "num_train_epochs": 1.0, "lr_scheduler_type": "linear", "warmup_ratio": 0.1, "seed": 42,
        "logging_steps": 5, "save_steps": 100000, "report_to": "none", "disable_tqdm": True,
        "output_dir": output_dir, "overwrite_output_dir": True,
        "_threads": threads, "_pad_id": 0,  # read by lf_driver.py, not LLaMA-Factory
    }
    if variant == "neat_packing":
        args["neat_packing"] = True
    if bf16:
        args["bf16"] = True
    return args


def driver_command(args: dict, output_dir: str, cache_dir: str = DEFAULT_CACHE) -> list[str]:
    """Write ``lf_args.json`` into ``output_dir``; the command line that trains with it."""
    os.makedirs(output_dir, exist_ok=True)
    config = os.path.join(output_dir, "lf_args.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump(args, f, indent=2)
    return [venv_python(cache_dir), os.path.join(BENCH_DIR, "lf_driver.py"), config]


def main(n_records: int = 200, variants: str | list[str] = "default,neat_packing", bf16: bool = False,
         output_root: str = os.path.join(BENCH_DIR, "runs"), cache_dir: str = DEFAULT_CACHE, threads: int = 2) -> None:
    """Install (once) and run the chosen variants; print each one's numbers."""
    error = install(cache_dir)
    if error:
        print(error)
        sys.exit(1)
    workload = build_workload(int(n_records), cache_dir)
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    for variant in names:
        out = os.path.join(output_root, f"llamafactory-{variant}{'-bf16' if bf16 else ''}")
        cmd = driver_command(build_args(workload, out, variant, bf16, threads), out, cache_dir)
        rc = subprocess.call(cmd, env={**os.environ, **driver_env(cache_dir, threads)})
        if rc != 0:
            print(f"LLaMA-Factory {variant} failed (exit {rc})")
            continue
        with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
        print(f"LLaMA-Factory {variant}: {m['effective_tokens_per_s']:.0f} effective tokens/s, padding "
              f"{m['padding_fraction']:.1%}, peak RSS {m['peak_rss_mb']:.0f} MB, loss {m['train_loss']:.4f}, "
              f"{m['steps']} steps")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
