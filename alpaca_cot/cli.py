"""Command-line plumbing shared by the scripts: seed-style argv, and errors as one clear line."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from alpaca_cot.errors import UserError
from alpaca_cot.flags import flag_fields

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


def command(*groups: type, defaults: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """Make ``fn(group1, group2, ...)`` a fire entry point whose flags are the groups' fields.

    The signature, the defaults and the ``--help`` text all come from the dataclasses (declared
    with ``alpaca_cot.flags.flag``); ``defaults`` overrides a default for this script alone. Each
    group is built (and so validated) before ``fn`` runs.
    """
    overrides = defaults or {}

    def wrap(fn: Callable) -> Callable:
        fields = [f for cls in groups for f in flag_fields(cls)]
        names = [f.name for f in fields]
        duplicated = {n for n in names if names.count(n) > 1}
        assert not duplicated, f"flags declared twice: {duplicated}"
        unknown = set(overrides) - set(names)
        assert not unknown, f"defaults for unknown flags: {unknown}"

        def default(f: dataclasses.Field) -> Any:
            if f.name in overrides:
                return overrides[f.name]
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

        def main(**kwargs: Any) -> Any:
            built = [cls(**{f.name: kwargs.get(f.name, default(f)) for f in flag_fields(cls)}) for cls in groups]
            return fn(*built)

        hints = {name: hint for cls in groups for name, hint in typing.get_type_hints(cls).items()}
        main.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default(f), annotation=hints[f.name])
             for f in fields])
        lines = [f"    {f.name}: {f.metadata['help']}" for f in fields]
        main.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join(lines)
        main.__name__ = main.__qualname__ = fn.__name__
        main.__module__ = fn.__module__
        return main

    return wrap


def check_argv(argv: list[str], main: Callable[..., Any]) -> None:
    """Refuse unknown flags and stray words before anything runs, naming the closest valid flags.

    fire would call ``main`` with the flags it knows and complain about the rest only afterwards,
    when an hours-long run has already trained with the wrong settings.
    """
    params = inspect.signature(main).parameters
    booleans = {n for n, p in params.items() if isinstance(p.default, bool)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # fire's own flags follow
            return
        if arg in ("-h", "--help"):
            i += 1
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: pass flags as --name value (see --help)")
        name, has_value, _ = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in params and not (name.startswith("no") and name[2:] in booleans):
            close = difflib.get_close_matches(name, list(params), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
            raise UserError(f"unknown flag --{name}{hint}")
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            i += 1  # its value (fire reads the next word as the value of any flag)
        i += 1


def run_cli(main: Callable[..., Any]) -> None:
    """``fire.Fire(main)`` on seed-compatible argv, after checking every flag name; our errors print
    as one line, exit status 2."""
    import fire

    argv = normalize_argv(sys.argv[1:])
    try:
        check_argv(argv, main)
        fire.Fire(main, command=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
