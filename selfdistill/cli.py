"""`selfdistill <command>`: one table of commands, flags generated from each stage's config.

Every command takes an optional YAML file (a stage section or a whole pipeline config), dotted
`key=value` overrides, and one `--flag` per config field. Bad input ends with one line on stderr
and exit code 2; the stage modules are imported only for the command that runs. The terminal shows
our own progress; the libraries' logs, warnings and bars go to run.log (selfdistill/console.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import time
import typing
from typing import Any

from selfdistill import __version__, console
from selfdistill.config import apply_overrides, field_help, from_dict, read_yaml
from selfdistill.errors import UserError
from selfdistill.stages import BY_NAME, TABLE, check_apart

log = logging.getLogger(__name__)

# command: (module, config class, stage function, one-line summary) — the only list of commands.
# `run`, then one command per stage that has one, from the stage table (its module, config class, function).
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "run": ("selfdistill.pipeline", "PipelineConfig", "run", "run the whole method from one YAML config (resumable)"),
    **{s.name: (s.module, s.config, s.function, s.command) for s in TABLE if s.command},
}


def _stage(name: str) -> tuple[type, Any]:
    module_name, config_name, function_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, function_name)


def _add_field_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    aliases = getattr(cls, "FLAG_ALIASES", {})  # e.g. run's `--from` for the field `from_stage`
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flags = ["--" + f.name.replace("_", "-"), *([aliases[f.name]] if f.name in aliases else [])]
        default = None if f.default is dataclasses.MISSING else f.default
        text = field_help(f) + (f" (default: {default})" if default not in (None, "", []) else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        item = (typing.get_args(tp) or (None,))[0]
        if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or dataclasses.is_dataclass(item):
            continue  # sections and lists of records come from YAML or dotted key=value overrides
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+", action="extend")
        parser.add_argument(*flags, **kwargs)


def _parse_value(raw: Any) -> Any:
    """Flags arrive as strings; turn numbers/booleans/null into YAML values, keep text as text."""
    import yaml

    if isinstance(raw, list):
        return [_parse_value(r) for r in raw]
    if not isinstance(raw, str):
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, (int, float, bool)) or value is None else raw


def build_config(name: str, cls: type, positionals: list[str], flags: dict[str, Any],
                 config_path: str | None) -> Any:
    overrides = [p for p in positionals if "=" in p and not p.endswith((".yaml", ".yml"))]
    rest = [p for p in positionals if p not in overrides]
    yaml_files = [p for p in rest if p.endswith((".yaml", ".yml"))]
    others = [p for p in rest if p not in yaml_files]
    if config_path:
        yaml_files.insert(0, config_path)
    if len(yaml_files) > 1:
        raise UserError(f"give one config file, not {len(yaml_files)}")
    data: dict[str, Any] = read_yaml(yaml_files[0]) if yaml_files else {}
    names = {f.name for f in dataclasses.fields(cls)}
    if name in data and name not in names and isinstance(data[name], dict):
        data = dict(data[name])  # a pipeline YAML: take this stage's section
    positional_field = getattr(cls, "POSITIONAL", None)
    if others:
        if positional_field is None or len(others) > 1:
            raise UserError(f"unexpected argument '{others[0]}'")
        data[positional_field] = others[0]
    for key, raw in flags.items():
        hint = typing.get_type_hints(cls)[key]
        data[key] = raw if hint is str or hint == (str | None) else _parse_value(raw)
    return from_dict(cls, apply_overrides(data, overrides))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="selfdistill", description="Prune an LLM, then recover it on its parent's own verified rewrites.",
        epilog="`selfdistill COMMAND --help` lists a command's options; any command also takes a YAML file and "
               "dotted key=value overrides.")
    parser.add_argument("--version", action="version", version=f"selfdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (*_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    # Known before any stage module is imported: the libraries read their quiet switches on import.
    with console.terminal(verbose="--verbose" in argv[1:]):
        return _command(argv[0], argv[1:])


def _command(name: str, argv: list[str]) -> int:
    try:
        cls, function = _stage(name)
        cmd = argparse.ArgumentParser(prog=f"selfdistill {name}", description=COMMANDS[name][3])
        cmd.add_argument("positionals", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
        cmd.add_argument("--config", default=None, help="YAML config (a stage section or a pipeline file)")
        cmd.add_argument("--verbose", action="store_true", help="also show the libraries' logs, warnings and "
                         f"progress bars on the terminal (they always go to {console.LOG_NAME})")
        _add_field_flags(cmd, cls)
        args = vars(cmd.parse_intermixed_args(argv))
        positionals, config_path = args.pop("positionals"), args.pop("config")
        args.pop("verbose")
        cfg = build_config(name, cls, positionals, args, config_path)
        result = function(cfg) if name == "run" else _single_stage(name, function, cfg)
    except UserError as e:
        console.discard_run_log()  # bad input leaves no file behind, a log included
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        log.info("%s", e, exc_info=True)  # the traceback, for a bug report: in the run log, not on the terminal
        where = f" (details in {console.run_log_path()})" if console.run_log_path() else ""
        print(f"selfdistill: error: {e.filename}: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfdistill: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _single_stage(name: str, function: Any, cfg: Any) -> Any:
    """One stage outside a run: its start and end on the terminal, the libraries' output in its run log, which
    starts once the stage has claimed its output (console.py; none for a stage that writes no --out)."""
    check_apart(BY_NAME[name], cfg)  # an --out on one of its inputs would replace what the stage reads
    console.say("%s ...", name)
    started = time.time()
    result = function(cfg)
    console.say("%s done in %s", name, console.duration(time.time() - started))
    return result
