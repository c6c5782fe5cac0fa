"""The instruction-data collection: convert sources to the unified format, check, curate, fetch.

Usage: python3 data/collection.py VERB [ARGS] [--FLAGS]   (python3 data/collection.py VERB --help)

    convert INPUT OUTPUT          source file or folder -> one unified .json/.jsonl file
    validate PATH...              a report per unified file: validity, kinds, trainable or not
    stats [PATH...]               the statistics table (Markdown) and relative-size chart (PNG); with
                                  PATHs, a table of those files: records by kind, pairs' reply lengths, bad rows
    mix OUTPUT SOURCE[:WEIGHT]... weighted mix of names, files or folders
    dedup INPUT OUTPUT            drop exact or normalized duplicates
    decontaminate INPUT OUTPUT --eval_file FILE   drop records sharing n-grams with an eval set's questions/answers
    download NAME                 fetch a registered dataset from the Hugging Face dataset
    formats                       the source formats convert knows

For example, to train with ``--data cot`` from the FLAN CoT files present:
    python3 data/collection.py convert ../shared/data/raw/flan_v2_cot data/CoT_data.json
"""

from __future__ import annotations

import functools
import os
import random
import sys
from collections.abc import Callable
from typing import Any

if sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: import the project's packages (alpaca_cot, data) from the repository root.
    sys.path[0] = os.path.dirname(sys.path[0])

import fire  # noqa: E402

from alpaca_cot.data import sources  # noqa: E402
from alpaca_cot.data.columns import parse_columns  # noqa: E402
from alpaca_cot.data.records import DataError  # noqa: E402
from alpaca_cot.io import write_text_atomic  # noqa: E402
from data import catalog, curation  # noqa: E402
from data.converters import (  # noqa: E402
    FORMATS,
    UndetectedFormat,
    convert_file,
    fill_placeholders,
    source_files,
)
from data.storage import check_file, check_writable, load_records, write_records  # noqa: E402

LIST_LIMIT = 50  # bad records listed before "... and N more"


def convert(input: str, output: str, format: str | None = None, seed: int = 42, skip_bad: bool = False,
            fill: str | dict | None = None, overwrite: bool = False, columns: str | dict | None = None) -> None:
    """Convert a source file, or every source file of a folder, into one unified-format file.

    The format of each file is detected from its content unless --format names it (see `formats`), or
    --columns maps its fields with LLaMA-Factory's names (prompt=question,response=answer; see README.md).
    Preference files (chosen and rejected replies; KTO labels) become preference pairs or KTO records.
    Records that cannot be converted, and files no format fits, stop the conversion with their
    file:line and field, unless --skip_bad leaves them out (and lists them). --fill
    name=X,author=Y fills {{name}}/{{author}} template slots. --seed chooses the chain-of-thought
    phrasings reproducibly (each row's phrasing follows from the seed and the row's content)."""
    check_writable(output, overwrite, (input,))
    columns = parse_columns(columns)
    if columns and format:
        raise DataError("pass --format or --columns, not both: --columns replaces the format")
    records, bad, failed = [], [], []
    for path in source_files(input):
        try:
            converted, report = convert_file(path, format, seed=seed, columns=columns)
        except DataError as e:
            hint = "; name one with --format (see `python3 data/collection.py formats`) or map its fields with " \
                "--columns (e.g. prompt=question,response=answer)" if isinstance(e, UndetectedFormat) else ""
            failed.append(f"{e}{hint}")
            continue
        print(report.summary())
        for line in report.repaired:
            print(f"  repaired: {line}")
        for line in report.notes:
            print(f"  note: {line}")
        records += converted
        bad += report.bad
    if failed and not skip_bad:
        if len(failed) == 1 and not bad:
            raise DataError(failed[0])
        raise DataError(f"{len(failed)} files and {len(bad)} records cannot be converted:\n"
                        f"{_listing(failed + bad)}\nNothing was written; pass --skip_bad to leave these out.")
    if bad and not skip_bad:
        raise DataError(f"{len(bad)} records cannot be converted:\n{_listing(bad)}\n"
                        "Nothing was written; pass --skip_bad to leave these records out.")
    if failed:
        print(f"skipped {len(failed)} files:\n{_listing(failed)}")
    if bad:
        print(f"skipped {len(bad)} bad records:\n{_listing(bad)}")
    if fill:
        records = fill_placeholders(records, _parse_fill(fill))
    if not records:
        raise DataError(f"{input}: no records to write")
    write_records(output, records, overwrite=overwrite)
    print(f"wrote {len(records)} records to {output}")


def validate(*paths: str) -> None:
    """Check unified-format files (or folders of .json/.jsonl files) and print a report per file:
    valid records, single-/multi-turn, SFT or preference pairs or KTO, trainable or not, errors with file:line
    and field."""
    if not paths:
        raise DataError("validate needs at least one file or folder")
    files = _files(paths)
    failed = 0
    for path in files:
        check = check_file(path)
        print("\n".join(check.lines()))
        failed += bool(check.errors)
    if failed:
        raise DataError(f"{failed} of {len(files)} files have invalid records")


def stats(*paths: str, out_dir: str | None = None, overwrite: bool = False) -> None:
    """Regenerate the statistics table of the collection (Markdown, also printed) from the registry
    and the files present under data/, and the relative-size chart (PNG), in --out_dir (default
    data/stats). Files an earlier run of stats wrote are replaced; others only with --overwrite.
    With PATHs (unified files or folders), print their table instead: valid records by kind (SFT,
    preference pairs, KTO), the pairs' mean reply lengths in characters, pairs refused for identical
    replies, and invalid records (those among them)."""
    if paths:
        print("| file | SFT | pairs | KTO | chosen (mean chars) | rejected (mean chars) | identical | bad |\n|"
              + "---|" * 8)
        for check in map(check_file, _files(paths)):
            pairs = check.kinds["pairs"]
            means = [f"{chars / pairs:.0f}" if pairs else "" for chars in (check.chosen_chars, check.rejected_chars)]
            print(f"| {check.path} | {check.kinds['sft']} | {pairs} | {check.kinds['kto']} | {' | '.join(means)} | "
                  f"{check.identical} | {len(check.errors)} |")
        return
    out_dir = out_dir or os.path.join(sources.DATA_DIR, "stats")
    table_path, chart_path = os.path.join(out_dir, "statistics.md"), os.path.join(out_dir, "relative_size.png")
    for path in (table_path, chart_path):
        if not catalog.generated_by_stats(path):
            check_writable(path, overwrite)
    table = catalog.render_table()
    print(table)
    write_text_atomic(table_path, f"{catalog.STATS_MARK}\n{table}")
    catalog.render_chart(chart_path)
    print(f"wrote {table_path} and {chart_path}")


def mix(output: str, *sources: str, total: int | None = None, seed: int = 42, overwrite: bool = False) -> None:
    """Mix sources into one shuffled file. A SOURCE is a registry name, a file or a folder, with an
    optional :WEIGHT. Without --total a weight scales its source (0.5 = half, 2 = twice); with
    --total the weights are proportions of --total records. Sampling is seeded by --seed."""
    if not sources:
        raise DataError("mix needs at least one source, e.g. `mix data/mixed.json alpaca:1 cot:0.5`")
    specs = [curation.parse_source(str(spec)) for spec in sources]
    check_writable(output, overwrite, tuple(source for source, _ in specs))
    pools = [load_records(source) for source, _ in specs]
    counts = curation.mix_counts([len(pool) for pool in pools], [weight for _, weight in specs], total)
    rng = random.Random(seed)
    mixed = []
    for (source, weight), pool, count in zip(specs, pools, counts, strict=True):
        mixed += curation.sample(pool, count, rng)
        print(f"{source}: {count} records from {len(pool)} (weight {weight:g})")
    rng.shuffle(mixed)
    write_records(output, mixed, overwrite=overwrite)
    print(f"wrote {len(mixed)} records to {output}")


def dedup(input: str, output: str, mode: str = "normalized", overwrite: bool = False) -> None:
    """Drop duplicate records, keeping the first. Records are compared on their content: two
    phrasings of one chain-of-thought row are duplicates. --mode exact compares texts as they are,
    normalized (default) after Unicode normalization, case folding and removing punctuation."""
    check_writable(output, overwrite, (input,))
    records = load_records(input, need_answer=False)
    kept = curation.dedup(records, mode)
    write_records(output, kept, overwrite=overwrite)
    print(f"removed {len(records) - len(kept)} duplicates ({mode}) of {len(records)} records; "
          f"wrote {len(kept)} to {output}")


def decontaminate(input: str, output: str, eval_file: str, n: int = 13, overwrite: bool = False) -> None:
    """Drop records that share an n-gram of --n tokens with the questions or answers of --eval_file
    (a unified file, or any source format `convert` reads). Our CoT phrasings and rationales are
    left out of the evaluation side, so only what the evaluation asks and expects counts. CJK
    characters are single tokens; a question shorter than --n tokens must appear whole."""
    check_writable(output, overwrite, (input, eval_file))
    records = load_records(input, need_answer=False)
    eval_records = []
    for path in source_files(eval_file):
        try:
            converted, report = convert_file(path, plain=True)
        except UndetectedFormat as e:
            raise DataError(f"{e}; convert it first (`python3 data/collection.py convert {path} OUT --format NAME`) "
                            "and pass the result as --eval_file") from None
        eval_records += converted
        if report.bad:
            print(f"note: {len(report.bad)} rows of {path} could not be read and are not used")
    if not eval_records:
        raise DataError(f"--eval_file {eval_file} yields no evaluation records, so nothing can be checked; "
                        "nothing was written")
    kept, dropped = curation.decontaminate(records, eval_records, n)
    write_records(output, kept, overwrite=overwrite)
    print(f"dropped {len(dropped)} of {len(records)} records sharing a {n}-gram with the {len(eval_records)} "
          f"evaluation records of {eval_file}; wrote {len(kept)} to {output}")
    if dropped:
        print("dropped record indices: " + ", ".join(map(str, dropped[:LIST_LIMIT]))
              + (" ..." if len(dropped) > LIST_LIMIT else ""))


def download(name: str, overwrite: bool = False) -> None:
    """Fetch a registered dataset (or each part of a combination) from the Hugging Face dataset
    QingyiSi/Alpaca-CoT into data/, so that `--data NAME` finds it."""
    paths = catalog.download(name, overwrite=overwrite)
    print(f"downloaded {len(paths)} files:\n" + "\n".join(f"  {path}" for path in paths))


def formats() -> None:
    """List the source formats `convert` knows, in the order detection tries them."""
    for fmt in FORMATS.values():
        if fmt.columns:
            keys = f"{fmt.columns} tab-separated fields per line"
        else:
            keys = "fields " + ", ".join(" | ".join(group) for group in fmt.groups)
        trainable = {"pairs": " [preference pairs]", "kto": " [KTO]"}.get(fmt.kind, "") if fmt.trainable \
            else " [no outputs: not trainable]"
        print(f"{fmt.name} ({keys}){trainable}\n    {fmt.description}")


def _files(paths: tuple[str, ...]) -> list[str]:
    """The files named, folders replaced by their source files."""
    return [f for path in paths for f in source_files(path)]  # a missing path: one line


def _listing(lines: list[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:LIST_LIMIT])
    return shown + (f"\n  ... and {len(lines) - LIST_LIMIT} more" if len(lines) > LIST_LIMIT else "")


def _parse_fill(fill: str | dict) -> dict[str, str]:
    if isinstance(fill, dict):
        return {str(k): str(v) for k, v in fill.items()}
    pairs = [item.partition("=") for item in str(fill).split(",") if item.strip()]
    if any(not sep for _, sep, _ in pairs):
        raise DataError(f"--fill {fill!r}: expected KEY=VALUE pairs separated by commas, e.g. name=Bot,author=Me")
    return {key.strip(): value.strip() for key, _, value in pairs}


def _cli(verb: Callable) -> Callable:
    """A verb that reports a DataError as one line on stderr with exit status 2, not a traceback."""
    @functools.wraps(verb)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            verb(*args, **kwargs)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return run


VERBS = {verb.__name__: _cli(verb) for verb in (convert, validate, stats, mix, dedup, decontaminate, download, formats)}

if __name__ == "__main__":
    fire.Fire(VERBS)
