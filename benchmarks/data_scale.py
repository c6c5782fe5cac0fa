"""Data preparation at scale: seconds and peak RSS of ``prepare_splits`` (uniform_finetune.py's data step)
for 20k, 200k and 1M records, then a cache hit of each, every case in a fresh process.

Usage:
  .venv/bin/python benchmarks/data_scale.py [--sizes 20000,200000,1000000] [--workers 2] [--work_dir DIR]
  .venv/bin/python benchmarks/data_scale.py --sizes 20000,200000 --npz_commit bbef18d  # the former npz cache

The records are ../shared/bench/bench_2k.json's 2,000 repeated, written as one JSON Lines file per size;
the tokenizer is ../shared/models/llama2-tokenizer; Alpaca template, --cutoff_len 512, no validation
split. "seconds" cover ``prepare_splits`` alone (reading and validating the file, tokenizing with
``--workers`` processes, writing the Arrow cache); "rec/CPU-s" divides the records by the CPU seconds
of the process and its workers (what the machine's other load does not change much: two free cores
give about twice it per second); "peak RSS" is the measuring process's own (``ru_maxrss``), and
"workers" the largest tokenizing process's. The load average is printed with
the figures: this machine may be shared. Targets (issue 11): peak RSS grows by at most 300 MB from
20k to 1M records; at least 3,000 records/s on 2 cores; a cache hit at 1M under 2 s.

``--npz_commit`` measures instead the ``prepare_splits`` of ``alpaca_cot/prepared.py`` at that commit
(the in-memory tokenization and npz cache this pipeline replaced), on the same files.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
SHARED = os.environ.get("ALPACA_COT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
RECORDS_FILE = os.path.join(SHARED, "bench", "bench_2k.json")
TOKENIZER = os.path.join(SHARED, "models", "llama2-tokenizer")
RSS_GROWTH_MB, RECORDS_PER_S, HIT_SECONDS = 300, 3_000, 2.0  # the targets


def write_records(path: str, n_records: int) -> None:
    """bench_2k.json's records repeated to ``n_records``, as JSON Lines (written once per size)."""
    if os.path.isfile(path):
        return
    with open(RECORDS_FILE, encoding="utf-8") as f:
        base = [json.dumps(r, ensure_ascii=False) + "\n" for r in json.load(f)]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(itertools.islice(itertools.cycle(base), n_records))
    os.replace(path + ".tmp", path)


def measure(data: str, cache_dir: str, workers: int = 2, npz_commit: str | None = None) -> None:
    """One case, in this process: print prepare_splits' seconds and the peak RSS as one JSON line."""
    sys.path.insert(0, ROOT)
    from types import SimpleNamespace

    import transformers

    from alpaca_cot.data.templates import get_template

    prepare_splits = _prepare_splits_at(npz_commit) if npz_commit else _current_prepare_splits()

    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    template = get_template("alpaca", tokenizer)
    args = SimpleNamespace(data=[data], data_files=None, subset=None, streaming=False, cutoff_len=512,
                           train_on_inputs=False, max_samples=None, val_set_size=0, seed=0,
                           preprocessing_num_workers=int(workers))
    before_mb, cpu_before, workers_before = _rss_mb(resource.RUSAGE_SELF), _cpu_seconds(), _cpu_seconds(True)
    started = time.perf_counter()
    train, _, info = prepare_splits(args, tokenizer, template, cache_dir=cache_dir)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    workers_cpu = _cpu_seconds(True) - workers_before
    first = train[0]["input_ids"][:4]  # the data is there, read through the memory map
    print(json.dumps({"cache": info["cache"], "records": len(train), "seconds": seconds, "cpu_seconds": cpu,
                      "workers_cpu_seconds": workers_cpu, "first_ids": first,
                      "rss_before_mb": before_mb, "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF),
                      "workers_peak_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}))


def _current_prepare_splits():
    from alpaca_cot.data.prepared import prepare_splits

    return prepare_splits


def _prepare_splits_at(commit: str):
    """``prepare_splits`` of alpaca_cot/prepared.py as it was at ``commit``."""
    source = subprocess.run(["git", "show", f"{commit}:alpaca_cot/prepared.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"prepared_{commit}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"prepared_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare_splits


def _cpu_seconds(children_only: bool = False) -> float:
    """CPU seconds of this process and its finished children (the tokenizing processes), or theirs alone."""
    who = (resource.RUSAGE_CHILDREN,) if children_only else (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, who))


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _run_case(data: str, cache_dir: str, workers: int, npz_commit: str | None) -> dict:
    extra = ["--npz_commit", npz_commit] if npz_commit else []
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "measure", "--data", data,
                           "--cache_dir", cache_dir, "--workers", str(workers), *extra],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"the case {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(sizes: str = "20000,200000,1000000", workers: int = 2, work_dir: str | None = None,
         npz_commit: str | None = None) -> None:
    """Run every size (a cache miss, then a hit) and print the table with the load average."""
    sizes_list = [int(s) for s in str(sizes).replace("(", "").replace(")", "").split(",") if str(s).strip()]
    work_dir = work_dir or tempfile.mkdtemp(prefix="data_scale-")
    what = f"the npz cache of {npz_commit} (one process)" if npz_commit else f"{workers} tokenizing processes"
    print(f"work dir {work_dir}; {what}; cores usable: {len(os.sched_getaffinity(0))}")
    print(f"{'records':>9} {'miss s':>8} {'records/s':>9} {'rec/CPU-s':>9} {'peak RSS MB':>11} {'workers MB':>10} "
          f"{'hit s':>6} {'hit RSS MB':>10}  load average (1, 5, 15 min) before -> after")
    rows = []
    for n in sizes_list:
        data = os.path.join(work_dir, f"bench_{n}.jsonl")
        write_records(data, n)
        cache = os.path.join(work_dir, f"cache_{n}" + (f"_npz_{npz_commit}" if npz_commit else ""))
        load_before = os.getloadavg()
        miss = _run_case(data, cache, workers, npz_commit)
        hit = _run_case(data, cache, workers, npz_commit)
        load_after = os.getloadavg()
        if (miss["cache"], hit["cache"]) != ("miss", "hit") or miss["first_ids"] != hit["first_ids"]:
            raise SystemExit(f"expected a miss then an equal hit, got {miss} and {hit}")
        rows.append((n, miss, hit))
        print(f"{n:>9} {miss['seconds']:>8.1f} {n / miss['seconds']:>9.0f} {n / miss['cpu_seconds']:>9.0f} "
              f"{miss['peak_rss_mb']:>11.0f} "
              f"{miss['workers_peak_rss_mb']:>10.0f} {hit['seconds']:>6.2f} {hit['peak_rss_mb']:>10.0f}  "
              f"{_load(load_before)} -> {_load(load_after)}", flush=True)
    if len(rows) > 1:
        growth = rows[-1][1]["peak_rss_mb"] - rows[0][1]["peak_rss_mb"]
        print(f"peak RSS growth {rows[0][0]} -> {rows[-1][0]} records: {growth:.0f} MB (target <= {RSS_GROWTH_MB}); "
              f"slowest rate {min(n / m['seconds'] for n, m, _ in rows):.0f} records/s (target >= {RECORDS_PER_S}); "
              f"hit at {rows[-1][0]}: {rows[-1][2]['seconds']:.2f} s (target < {HIT_SECONDS})")


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    import fire

    if sys.argv[1:2] == ["measure"]:
        fire.Fire(measure, sys.argv[2:])
    else:
        fire.Fire(main)
