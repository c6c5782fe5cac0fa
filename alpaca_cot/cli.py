"""Command-line plumbing shared by the scripts: seed-style argv, and errors as one clear line."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from alpaca_cot.errors import UserError, disk_full
from alpaca_cot.flags import flag_fields

# Flags the seed took as space-separated lists (argparse nargs); fire wants one value.
LIST_FLAGS = ("lora_target_modules", "data")
CONFIG_HELP = ("    config: a YAML or JSON file whose keys are these flags (a run's finetune_args.json is one); "
               "flags given on the command line override it")


CONFIG_FILES: list[str] = []  # the --config file of this command: an input no output may replace


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
        main.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join([CONFIG_HELP, *lines])
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
    seen: set[str] = set()
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
            raise UserError(f"unknown flag --{name}{_closest(name, params)}")
        flag_name = name if name in params else name[2:]
        if flag_name in seen:  # fire would silently take the last one
            raise UserError(f"--{flag_name} is given twice; pass it once")
        seen.add(flag_name)
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            i += 1  # its value (fire reads the next word as the value of any flag)
        i += 1


def _closest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config FILE`` value or None, argv without it)."""
    for i, arg in enumerate(argv):
        name, has_value, value = arg.partition("=")
        if name == "--config":
            if has_value:
                return value, argv[:i] + argv[i + 1:]
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise UserError("--config needs a file: a YAML or JSON file whose keys are this script's flags")
            return argv[i + 1], argv[:i] + argv[i + 2:]
    return None, argv


def read_config(path: str, main: Callable[..., Any]) -> dict[str, Any]:
    """The flags a YAML or JSON config file sets; an unknown key is refused like an unknown flag."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from e
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from e
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a mapping of flag names to values")
    params = inspect.signature(main).parameters
    for key in values:
        if str(key).replace("-", "_") not in params:
            raise UserError(f"unknown key {key!r} in --config {path}{_closest(str(key), params)}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def with_defaults(main: Callable[..., Any], values: dict[str, Any]) -> Callable[..., Any]:
    """``main`` with ``values`` as its defaults: a config file's settings, which command-line flags override."""

    def configured(**kwargs: Any) -> Any:
        return main(**{**values, **kwargs})

    signature = inspect.signature(main)
    configured.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(default=values.get(name, p.default)) for name, p in signature.parameters.items()])
    configured.__doc__, configured.__name__ = main.__doc__, main.__name__
    return configured


def run_cli(main: Callable[..., Any], interrupted: str = "interrupted") -> None:
    """``fire.Fire(main)`` on seed-compatible argv (plus ``--config FILE``), after checking every flag name;
    our errors print as one line, exit status 2; Ctrl-C prints ``interrupted`` as one line, exit status 130."""
    import fire

    try:
        config, argv = split_config(normalize_argv(sys.argv[1:]))
        CONFIG_FILES[:] = [config] if config else []
        check_argv(argv, main)
        fire.Fire(with_defaults(main, read_config(config, main)) if config else main, command=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not disk_full(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: the disk is full{where}; nothing partial was kept: free some space and run the same "
              "command again (a training run: add --resume_from_checkpoint)", file=sys.stderr)
        sys.exit(2)
