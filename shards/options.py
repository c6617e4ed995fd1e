"""Command lines from typed configs: one option per field, config files, the reference's spellings.

Both stages declare their settings once, as dataclass fields made with `setting(...)` (default,
help text, --help group, choices, aliases); `config_command(cls, ...)` turns them into a click
command, so `--help` documents every setting and cannot drift from the config. Every command made
here also:

- takes `--config FILE` (TOML, YAML or JSON; keys are the option names with `_` or `-`), whose
  values become the defaults that flags on the command line then override. The resolved config
  a run saves (train's `OUT/train_config.json`, a cache's `manifest.json` `config` section) is
  itself a valid config file, so a run can be repeated from it.
- accepts every option in its underscore spelling (`--train_batch_size` as `--train-batch-size`),
  as diffusers' `train_t2i_adapter_sdxl.py` spells them, and that script's multi-value forms
  (`--validation_image a.png b.png` for `--validation-image a.png --validation-image b.png`).
- refuses an option of the *other* stage with a message naming that stage and why
  (`train --resolution` -> "resolution is fixed at precompute: ..."), and accepts the reference's
  options that have no effect here with one line saying why, printed by the main process only
  (RANK / LOCAL_RANK 0, or no launcher), so a run of N processes prints it once.

This module is only about command lines; what a setting means is the stage's business.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

import click

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


class _Size(click.ParamType):
    """A byte count as users type it: 268435456, 256MiB, 1GB (`shards.units.parse_size`)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        from .units import parse_size

        try:
            return parse_size(value, f"--{param.name.replace('_', '-')}" if param else None)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = _Size()


class _NumberPair(click.ParamType):
    """Two numbers as users type them, "0.3,0.8" or "0.3 0.8" (a list of two in config files) ->
    a (float, float) tuple. What the numbers may be is the setting's business."""

    name = "A,B"

    def convert(self, value, param, ctx):
        parts = list(value) if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
        try:
            if len(parts) != 2:
                raise ValueError
            return (float(parts[0]), float(parts[1]))
        except (TypeError, ValueError):
            self.fail(f"expected two numbers 'A,B', e.g. '0.3,0.8', got {value!r}", param, ctx)


NUMBER_PAIR = _NumberPair()


def setting(default: Any, help: str, group: str, *, choices: Iterable[str] | None = None, aliases: Iterable[str] = (),
            multiple: bool = False, required: bool = False, metavar: str | None = None, cli: bool = True,
            click_type: click.ParamType | None = None) -> Any:
    """A dataclass field with what its command-line option needs. `aliases` are extra option
    names (`--train-batch-size`); `multiple` makes a repeatable option holding a tuple;
    `click_type` a value type other than the annotation's (e.g. SIZE); `cli=False` keeps a field
    out of the command line (set only from config files or code)."""
    meta = {"help": help, "group": group, "aliases": tuple(aliases), "multiple": multiple, "required": required,
            "metavar": metavar, "cli": cli, "click_type": click_type}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if multiple and default == ():
        return field(default=(), metadata=meta)
    return field(default=default, metadata=meta)


def _base_type(annotation: Any) -> type:
    """int | None -> int; 'tuple[str, ...]' -> str; the type click converts a value to."""
    if isinstance(annotation, str):
        name = annotation.split("|")[0].strip()
        if name.startswith("tuple["):
            name = name[len("tuple["):].split(",")[0].strip()
        return {"int": int, "float": float, "str": str, "bool": bool}[name]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        return _base_type(typing.get_args(annotation)[0])
    return annotation


def option_names(f: dataclasses.Field) -> list[str]:
    return [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and "help" in f.metadata]


def _option(f: dataclasses.Field) -> Callable:
    meta = f.metadata
    kind = _base_type(f.type)
    kwargs: dict[str, Any] = {"help": meta["help"], "show_default": True}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if kind is bool and f.default is not False:
        # Default on, or None ("decided at run time"): the flag needs an off switch too.
        names = [f"{n}/--no-{n[2:]}" for n in option_names(f)]
        kwargs.update(is_flag=True, default=f.default, show_default=f.default is not None)
        return click.option(*names, f.name, **kwargs)
    if kind is bool:
        kwargs.update(is_flag=True, default=f.default)
    elif meta.get("multiple"):
        kwargs.update(multiple=True, type=kind, default=(), show_default=False)
    else:
        kwargs["type"] = (click.Choice(meta["choices"]) if "choices" in meta else meta.get("click_type") or kind)
        if meta.get("required"):
            kwargs.update(required=True, show_default=False)
        else:
            kwargs["default"] = f.default
    return click.option(*option_names(f), f.name, **kwargs)


# ---------------------------------------------------------------------------------------------
# Config files


class ConfigFileError(click.BadParameter):
    pass


def _read_mapping(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigFileError(f"{path}: {e.strerror or e}") from None
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text.decode("utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text.decode("utf-8"))
        elif suffix == ".json":
            data = json.loads(text.decode("utf-8"))
        else:
            raise ConfigFileError(f"{path}: unknown config format {suffix!r}; use {', '.join(CONFIG_SUFFIXES)}")
    except ConfigFileError:
        raise
    except Exception as e:  # tomllib, yaml and json raise their own error types
        raise ConfigFileError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def load_config_file(path: str | Path, cls: type, *, sections: Mapping[str, str | None] | None = None,
                     foreign: Mapping[str, "Foreign"] | None = None) -> dict:
    """{field name: value} from a config file for `cls`. Keys may use `-` or `_`; unknown keys
    are an error listing each. `sections` maps a top-level key of files the tool itself writes to
    what to do with it: a key name to read the settings from (a manifest's "config"), or None to
    ignore it (a run's "resolved" facts)."""
    path = Path(path).expanduser()
    data = _read_mapping(path)
    sections = sections or {}
    # The other stage's own files, said as such (not as a list of its settings, each refused).
    if isinstance(data.get("resolved"), dict) and "resolved" not in sections:
        raise ConfigFileError(f"{path}: a training run's saved settings (train_config.json): give it to "
                              "`python -m train --config`")
    if isinstance(data.get("config"), dict) and "shards" in data and "config" not in sections:
        raise ConfigFileError(f"{path}: a cache's manifest, which holds `python -m precompute`'s settings: give it to "
                              "precompute's --config (train reads a cache with --cache)")
    for key, use in sections.items():
        if key in data:
            if use is None:
                data = {k: v for k, v in data.items() if k != key}
            elif isinstance(data[key], dict) and key == use:
                data = data[key]
    names = {f.name: f for f in dataclasses.fields(cls)}
    # The options' other names (the reference's spellings) are keys too, as on the command line.
    aliases = {a.lstrip("-").replace("-", "_"): f.name for f in names.values() for a in f.metadata.get("aliases", ())}
    out, unknown, wrong, seen = {}, [], [], {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        if name not in names:
            unknown.append(str(key))
            continue
        if name in seen:
            wrong.append(f"{key} and {seen[name]} are the same setting; give it once")
            continue
        seen[name] = key
        problem = _value_problem(names[name], value)
        if problem:
            wrong.append(f"{key} {problem}, got {value!r}")
            continue
        if names[name].metadata.get("multiple") and value is not None:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        out[name] = value
    # The other stage's settings (or the reference's without effect here) say where they belong.
    other = {k: (foreign or {}).get(k.replace("_", "-")) for k in unknown}
    elsewhere = [f"{k} {f.message}" for k, f in sorted(other.items()) if f is not None and not f.accepted]
    unknown = [k for k, f in other.items() if f is None]
    if not (unknown or elsewhere) and _main_process():  # said as for the flag, once per run
        for k, f in sorted(other.items()):
            if f is not None and f.accepted:
                click.echo(f"note: {k} in {path} has no effect here: {f.message}", err=True)
    if unknown or elsewhere:
        raise ConfigFileError(f"{path}: " + "; ".join(
            ([f"unknown setting(s) {', '.join(sorted(unknown))}"] if unknown else []) + elsewhere))
    if wrong:
        raise ConfigFileError(f"{path}: " + "; ".join(wrong))
    return out


_KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _scalar_problem(kind: type, value: Any) -> str | None:
    """Why `value` (as a config file gives it) cannot be a `kind`; None when it can. Strings are
    left to the option's own conversion, as if typed on the command line."""
    if isinstance(value, str):
        return None
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {_KIND_WORDS[kind]}"
    if kind is int and not (isinstance(value, int) or value.is_integer()):
        return "must be a whole number"
    return None


def _value_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why a config file's `value` cannot be setting `f`; None when it can (click converts it as
    it converts the command line). Catches what conversion would silently change (64.5 -> 64,
    true -> 1) or fail on with a traceback (a list or table where a number belongs)."""
    if value is None:
        return None
    meta = f.metadata
    try:
        kind = _base_type(f.type)
    except (KeyError, IndexError, TypeError):
        return None  # a setting of a shape of its own: its check is its own
    if meta.get("click_type") is NUMBER_PAIR:
        ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) == 2 and not any(
            _scalar_problem(float, v) for v in value))
        return None if ok else "must be two numbers, e.g. [0.3, 0.8]"
    if meta.get("click_type") is SIZE:
        return _scalar_problem(int, value) and "must be a size, e.g. 256MiB or 268435456"
    if kind not in _KIND_WORDS:
        return None
    if meta.get("multiple"):
        items = value if isinstance(value, (list, tuple)) else [value]
        bad = next((p for p in (_scalar_problem(kind, v) for v in items) if p), None)
        return f"must be {_KIND_WORDS[kind]} or a list of them" if bad else None
    return _scalar_problem(kind, value)


def _load_config(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Every --config file, in order: a later file's settings replace an earlier one's (a base
    file, then overrides); each file is read and checked whole."""
    cmd = ctx.command
    merged: dict = {}
    for path in value or ():
        merged.update(load_config_file(path, cmd.config_class, sections=cmd.config_sections,
                                       foreign=getattr(cmd, "foreign", None)))
    if merged:
        ctx.default_map = {**(ctx.default_map or {}), **merged}
    return tuple(value or ())


# ---------------------------------------------------------------------------------------------
# The reference's spellings


@dataclasses.dataclass(frozen=True)
class Foreign:
    """An option of the other stage (or of the reference only): refused, or accepted without effect.
    `message` follows the option's name: "is fixed at precompute: ..." / "belongs to train: ..."."""

    message: str
    takes_value: bool = True
    accepted: bool = False  # True: no effect here, said in one line; False: refused


def _main_process() -> bool:
    """False in the ranks other than 0 of a launched run. Options are parsed before any process
    group exists, so the launcher's variables decide: RANK (global, set by accelerate launch's
    multi-process launchers and torchrun), else LOCAL_RANK; neither set means one process."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            return value == "0"
    return True


def _long(token: str) -> str | None:
    """'--foo_bar=1' -> 'foo-bar'; None for anything that is not a long option."""
    if not token.startswith("--") or token == "--":
        return None
    return token[2:].split("=", 1)[0].replace("_", "-")


class ConfigCommand(click.Command):
    """A click command over a config class: `--config FILE`, underscore spellings, the
    reference's multi-value options, and the other stage's options named as such."""

    config_class: type
    config_sections: Mapping[str, str | None]
    foreign: Mapping[str, Foreign]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.normalise(list(args)))

    def normalise(self, args: list[str]) -> list[str]:
        """Rewrite the reference's forms into ours; refuse or note the foreign ones."""
        multiple = {n.lstrip("-"): f for f in cli_fields(self.config_class) if f.metadata.get("multiple")
                    for n in option_names(f)}
        known = {n.lstrip("-") for p in self.params for n in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        out: list[str] = []
        refused: list[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            name = _long(token)
            if name is None:
                out.append(token)
                i += 1
                continue
            if token == "--":
                out += args[i:]
                break
            foreign = self.foreign.get(name)
            if foreign is not None and name not in known:
                takes = foreign.takes_value and "=" not in token
                value = args[i + 1] if takes and i + 1 < len(args) else None
                typed = token.split("=", 1)[0]
                if foreign.accepted:
                    if _main_process():  # once per run, not once per rank
                        click.echo(f"note: {typed} has no effect here: {foreign.message}", err=True)
                else:
                    refused.append(f"{typed} {foreign.message}")
                i += 2 if takes and value is not None else 1
                continue
            if name in multiple and "=" not in token:
                values = []
                j = i + 1
                while j < len(args) and not (args[j].startswith("-") and len(args[j]) > 1 and
                                             not args[j][1:2].isdigit()):
                    values.append(args[j])
                    j += 1
                flag = option_names(multiple[name])[0]
                if not values:
                    out.append(token)  # click reports the missing value
                for v in values:
                    out += [flag, v]
                i = j
                continue
            out.append(token)
            i += 1
        if refused:
            raise click.UsageError("\n".join(refused))
        return out


def config_command(cls: type, *, name: str | None = None, foreign: Mapping[str, Foreign] | None = None,
                   sections: Mapping[str, str | None] | None = None, **command_kwargs: Any) -> Callable:
    """Decorator: a ConfigCommand whose options are `cls`'s `setting` fields plus `--config`.
    The decorated function receives the field values as keyword arguments (and `config`)."""
    def decorate(fn: Callable) -> click.Command:
        for f in reversed(cli_fields(cls)):
            fn = _option(f)(fn)
        fn = click.option("--config", "config", type=click.Path(dir_okay=False), is_eager=True, expose_value=True,
                          callback=_load_config, metavar="FILE", multiple=True,
                          help="Read settings from a TOML, YAML or JSON file (keys are the option names); options "
                               "given on the command line override it. Repeatable: a later file overrides an "
                               "earlier one. A run's saved config is a valid file.")(fn)
        context = {"help_option_names": ["-h", "--help"], "max_content_width": 110,
                   "token_normalize_func": lambda s: s.replace("_", "-"),
                   **command_kwargs.pop("context_settings", {})}
        cmd = click.command(name=name, cls=ConfigCommand, context_settings=context, **command_kwargs)(fn)
        cmd.config_class = cls
        cmd.config_sections = dict(sections or {})
        cmd.foreign = {k.replace("_", "-"): v for k, v in (foreign or {}).items()}
        return cmd

    return decorate


__all__ = ["CONFIG_SUFFIXES", "NUMBER_PAIR", "SIZE", "ConfigCommand", "ConfigFileError", "Foreign", "cli_fields", "config_command",
           "load_config_file", "option_names", "setting"]
