"""Command-line plumbing shared by the scripts: seed-style argv, and errors as one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from alpaca_cot.errors import UserError

# Flags the seed took as space-separated lists (argparse nargs); fire wants one value.
LIST_FLAGS = ("lora_target_modules", "data")


def normalize_argv(argv: list[str]) -> list[str]:
    """Rewrite seed/launcher argv for fire.

    ``--lora_target_modules q_proj v_proj`` becomes ``--lora_target_modules=q_proj,v_proj``;
    ``--local-rank=N`` / ``--local_rank N`` (added by ``torch.distributed.launch``) is removed,
    its value kept in ``LOCAL_RANK`` where a launcher ran us but did not set it.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        name = name.replace("-", "_")
        if name == "local_rank":
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            if value and "WORLD_SIZE" in os.environ:  # launched: keep the rank even if the launcher only passed argv
                os.environ.setdefault("LOCAL_RANK", value)
        elif name in LIST_FLAGS and not has_value:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            out.append(f"--{name}={','.join(values)}")
        else:
            out.append(arg)
        i += 1
    return out


def as_list(value: Any) -> list[str] | None:
    """A list flag from fire (str "a,b", tuple, list, a lone number, or None) as a list of strings."""
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def run_cli(main: Callable[..., Any]) -> None:
    """``fire.Fire(main)`` on seed-compatible argv; our errors print as one line, exit status 2."""
    import fire

    try:
        fire.Fire(main, command=normalize_argv(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
