"""A parameter is declared once: every config field is reachable with --set, and every command-line
option is a config field whose default and help the option shows (bloger_cli/options.py)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import click
import pytest
import typer
from pydantic import ValidationError

from bloger_cli.cli import app
from bloger_cli.config import STAGE_CONFIGS, resolve_config
from bloger_cli.options import field_default, field_of, leaf_fields, show_default

REQUIRED = {"prepare": {"input": Path("raw.json")}, "export-ids": {"out": Path("ids.parquet")},
            "recommend": {"out": Path("recs.parquet")}, "export-model": {"out": Path("model.pt")},
            "report": {"out": Path("report")}}
TABLE = {"source": "table", "user_col": "u", "item_col": "i"}
CONTEXT = {  # settings a field only applies with (the configs' cross-field checks)
    **{("prepare", f"{c}_col"): TABLE for c in ("user", "item", "time", "rating", "item_key")},
    ("recommend", "model"): {"histories": Path("new.jsonl")},
}


def _scalar(annotation: Any) -> Any:
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def candidates(field) -> list[Any]:
    """Values other than the default, most likely valid first (a TOML literal each)."""
    default, kind = field_default(field), _scalar(field.annotation)
    if typing.get_origin(kind) is Literal:
        return [f'"{v}"' for v in typing.get_args(kind) if v != default]
    if kind is bool:
        return [str(not default).lower()]
    if kind is int:
        return [str(v) for v in ((default + 1, default - 1, 2) if default is not None else (3, 64, 1))]
    if kind is float:
        return [repr(v) for v in ((default / 2, default * 2, 0.5) if default else (0.25, 0.5, 2.0))]
    if typing.get_origin(kind) is list:
        return ["[8]", "[1, 2]"]
    return ['"elsewhere"']


def test_every_config_field_is_reachable_with_set():
    unreachable = []
    for stage, model in STAGE_CONFIGS.items():
        for key, field in leaf_fields(model).items():
            base = {**REQUIRED.get(stage, {}), **CONTEXT.get((stage, key), {})}
            for raw in candidates(field):
                try:
                    cfg = resolve_config(stage, None, base, [f"{key}={raw}"])
                except ValidationError:
                    continue
                value: Any = cfg
                for part in key.split("."):
                    value = getattr(value, "from_" if part == "from" else part)
                if value != field_default(field):
                    break
            else:
                unreachable.append(f"{stage}: {key}")
    assert unreachable == [], f"config fields no --set value can change: {unreachable}"


def test_set_names_unknown_keys():
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        resolve_config("train-bilevel", None, None, ["train.no_such_key=1"])


def registered() -> list[tuple[str, click.Command, Any]]:
    group = typer.main.get_command(app)
    out = []
    for info in app.registered_commands:
        func = info.callback
        if hasattr(func, "config_options"):
            out.append((info.name, group.commands[info.name], func))
    return out


def test_every_stage_command_takes_its_options_from_config_fields():
    names = {name for name, _, _ in registered()}
    assert names >= {"prepare", "embed", "tokenize", "train-bilevel", "evaluate", "baseline", "export-ids",
                     "recommend", "export-model", "report"}


@pytest.mark.parametrize("name,command,func", registered(), ids=[n for n, _, _ in registered()])
def test_each_option_maps_to_a_field_with_its_default(name, command, func):
    params = {p.name: p for p in command.params if p.param_type_name == "option"}
    for opt in func.config_options:
        field = field_of(func.config_model, opt.key)  # KeyError: an option without a field
        param = params[opt.param]
        assert param.default is None, f"{name} {opt.decls()[0]}: a set default would override the config file"
        shown = show_default(field_default(field))
        assert (param.help or "").endswith(shown) and (param.help or "").strip(), \
            f"{name} {opt.decls()[0]}: help {param.help!r} does not end with the field's default {shown!r}"
        assert field.description, f"{name}: field {opt.key} has no description for its option's help"


def test_option_values_reach_the_config():
    """An option given on the command line lands in the resolved config (the --json echo of a stage that
    fails fast shows nothing, so check through resolve_config with the option's parameter mapping)."""
    _, command, func = next(r for r in registered() if r[0] == "train-bilevel")
    opts = {opt.key: opt for opt in func.config_options}
    ctx = command.make_context("train-bilevel", ["--epochs", "3", "--lambda", "0.25", "--val-users", "7",
                                                 "--time-budget", "2m"])
    values = {key: ctx.params[opt.param] for key, opt in opts.items()}
    cfg = resolve_config("train-bilevel", None, values, None)
    assert (cfg.epochs, cfg.bilevel.lam, cfg.train.val_users, cfg.train.time_budget) == (3, 0.25, 7, 120.0)
