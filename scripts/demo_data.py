"""The main job's data: a training mix of instruction and chain-of-thought records, and a held-out set of
yes/no chain-of-thought questions to score the model on before and after fine-tuning.

Where the data comes from, first found first:
1. a mirror of the shared data folder (``$ALPACA_COT_SHARED``, default ``../shared``): its original
   source files (FLAN CoT TSVs, the Stanford Alpaca data), converted here;
2. the original collection on the Hugging Face hub (dataset QingyiSi/Alpaca-CoT): ``alpaca`` and ``cot``,
   fetched by ``data/collection.py download`` into ``data/``, where ``--data alpaca`` / ``--data cot``
   find them too.
Offline and without a mirror it stops with one sentence saying what to do (exit status 2).

The held-out questions never reach training: training records sharing a 13-gram with them are dropped
(``data/collection.py decontaminate``'s rule). Written atomically: OUT/train.json, OUT/heldout.json.

Usage: python3 scripts/demo_data.py [--out .cache/demo] [--train 144] [--heldout 32]
"""

from __future__ import annotations

import os
import random
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # import the project's packages

from alpaca_cot.data.records import DataError, read_records  # noqa: E402
from alpaca_cot.data.sources import DATA_DIR, HF_DATASET, resolve_data  # noqa: E402
from alpaca_cot.evaluation.answers import final_answer  # noqa: E402
from alpaca_cot.io import write_json_atomic  # noqa: E402
from data import catalog, curation  # noqa: E402
from data.converters import convert_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files of the mirror (paths under data/raw) and names of the hub's collection (data/registry.json).
MIRROR_FILES = {"alpaca": "alpaca_chinese_dataset/alpaca_data-0-3252-英文.json",
                "cot": ["flan_v2_cot/strategyqa_train.tsv", "flan_v2_cot/gsm8k_train.tsv"]}
HUB_NAMES = ("alpaca", "cot")


def mirror_dir() -> str:
    """The mirror's raw-data folder: $ALPACA_COT_SHARED/data/raw, default ../shared/data/raw."""
    shared = os.environ.get("ALPACA_COT_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    return os.path.join(shared, "data", "raw")


def from_mirror(raw: str) -> tuple[list[dict], list[dict]]:
    """(instruction records, CoT records) converted from the mirror's source files."""
    alpaca, _ = convert_file(os.path.join(raw, MIRROR_FILES["alpaca"]))  # bad rows left out, as with --skip_bad
    cot = [r for name in MIRROR_FILES["cot"] for r in convert_file(os.path.join(raw, name))[0]]
    return alpaca, cot


def from_hub() -> tuple[list[dict], list[dict]]:
    """(instruction records, CoT records) of the hub's ``alpaca`` and ``cot`` files, downloaded once into data/."""
    pools = []
    for name in HUB_NAMES:
        try:
            paths = resolve_data([name])
        except DataError:  # not downloaded yet
            paths = catalog.download(name)
        pools.append([r for path in paths for r in read_records(path)])
    return pools[0], pools[1]


def split(alpaca: list[dict], cot: list[dict], train: int, heldout: int, seed: int = 0) -> tuple[list, list]:
    """(training mix: half instruction, half CoT records; held-out yes/no CoT records kept out of it)."""
    rng = random.Random(seed)
    yes_no = [i for i, r in enumerate(cot) if (final_answer(r) or ("",))[0] == "yesno"]
    if len(yes_no) < heldout:
        raise DataError(f"only {len(yes_no)} yes/no chain-of-thought records were found; {heldout} are needed")
    held_ids = set(rng.sample(yes_no, heldout))
    held = [cot[i] for i in sorted(held_ids)]
    rest = [r for i, r in enumerate(cot) if i not in held_ids]
    mix = []
    for pool, count in ((alpaca, train // 2), (rest, train - train // 2)):
        # candidates first (4x what is needed), so the n-gram check reads a few hundred records, not the collection
        candidates = rng.sample(pool, min(len(pool), 4 * count))
        kept, _ = curation.decontaminate(candidates, held)
        if len(kept) < count:
            raise DataError(f"only {len(kept)} of {len(candidates)} candidate records share no 13-gram with the "
                            f"held-out questions; {count} are needed")
        mix += kept[:count]
    rng.shuffle(mix)
    return mix, held


def main(out: str = ".cache/demo", train: int = 144, heldout: int = 32) -> None:
    """Write OUT/train.json and OUT/heldout.json from the mirror, else the hub."""
    raw = mirror_dir()
    if os.path.isdir(raw):
        print(f"data: the mirror {raw}")
        alpaca, cot = from_mirror(raw)
    else:
        print(f"data: no mirror at {raw}; the Hugging Face dataset {HF_DATASET} (cached in {DATA_DIR})")
        try:
            alpaca, cot = from_hub()
        except DataError:
            why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else "unreachable"
            print(f"error: the main job has no data: there is no mirror at {raw} and the Hugging Face hub cannot serve "
                  f"{HF_DATASET} ({why}), so run it once online or set ALPACA_COT_SHARED to a folder that holds "
                  "data/raw of the shared data.", file=sys.stderr)
            sys.exit(2)
    mix, held = split(alpaca, cot, train, heldout)
    write_json_atomic(os.path.join(out, "train.json"), mix)
    write_json_atomic(os.path.join(out, "heldout.json"), held)
    print(f"wrote {len(mix)} training records and {len(held)} held-out yes/no questions to {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
