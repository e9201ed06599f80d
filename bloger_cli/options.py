"""Command-line options made from config fields, so that a parameter is declared once.

A stage's settings are the fields of its pydantic config (type, default, bounds, description). A
command names the fields it offers as options (`Opt("train.val_users")`); the option's flag, type and
help text, ending with the field's default, come from the field. What a user does not give stays None
and falls through to the config file and the field default (`config.resolve_config`). The options every
stage command shares (`--workspace`, `--config`, `--set`, `--json`, `--force`, `--lock-timeout`, and
`--run` where runs apply) are declared here once.

`tests/unit/test_options.py` walks every config model: each field is reachable with `--set`, each
option maps to a field and shows that field's default.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from bloger_cli.workspace import DEFAULT_WORKSPACE


@dataclass(frozen=True)
class Opt:
    """A config field offered as a command-line option: `key` is its dotted path in the stage config;
    `flags` default to `--last-part-of-key`; `kind` overrides the option's type where the field accepts
    text the CLI should pass through (a duration, a list of cut-offs)."""

    key: str
    flags: tuple[str, ...] = ()
    kind: type | None = None

    def decls(self) -> list[str]:
        return list(self.flags) or ["--" + self.key.split(".")[-1].rstrip("_").replace("_", "-")]

    @property
    def param(self) -> str:
        """The Python parameter name of the option (unique within a command)."""
        return self.key.replace(".", "__")


def field_of(model: type[BaseModel], key: str) -> FieldInfo:
    """The pydantic field at a dotted key of a config model (KeyError naming the key when absent)."""
    *sections, name = key.split(".")
    for section in sections:
        model = _model_type(model.model_fields[section].annotation)
    fields = model.model_fields
    if name in fields:
        return fields[name]
    for field in fields.values():  # an alias: ExportConfig.from_ is `from` in files and --set
        if field.alias == name:
            return field
    raise KeyError(f"{model.__name__} has no field {name!r}")


def field_default(field: FieldInfo) -> Any:
    """The value a field takes when nothing sets it."""
    return field.get_default(call_default_factory=True)


def leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every settable field of a config model by dotted key, nested sections flattened."""
    out: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = _model_type(field.annotation, strict=False)
        if sub is not None:
            out.update(leaf_fields(sub, key + "."))
        else:
            out[key] = field
    return out


def _model_type(annotation: Any, strict: bool = True) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if strict:
        raise KeyError(f"{annotation} is not a config section")
    return None


def show_default(value: Any) -> str:
    """A default as the help text shows it: `(default: 5)`, `(default: 1,5,10,20)`; nothing for None.
    (Not `[5]`: rich reads `[cosine]` as markup and drops it.)"""
    if value is None:
        return ""
    if isinstance(value, list):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        text = "on" if value else "off"
    else:
        text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"(default: {text})"


def help_text(field: FieldInfo) -> str:
    """The option's help: the field's description, its choices when they are fixed, then its default."""
    words = (field.description or "").strip()
    choices = _choices(field.annotation)
    if words and words.split()[0].rstrip(":,") not in choices:  # "fixed: ..." names a choice: keep its case
        words = words[:1].upper() + words[1:]
    if choices and not all(c in words for c in choices):
        words = f"{words}: {' | '.join(choices)}" if words else " | ".join(choices)
    if words and not words.endswith((".", ")", "]")):
        words += "."
    default = show_default(field_default(field))
    return f"{words} {default}".strip()


def _choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [str(v) for v in typing.get_args(annotation)]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    literal = [a for a in args if typing.get_origin(a) is Literal]
    return [str(v) for a in literal for v in typing.get_args(a)]


def cli_type(field: FieldInfo) -> type:
    """The Python type the option parses into: the field's scalar type; text for choices and lists (the
    config validates them, with the same messages as for a config file)."""
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(field.annotation) in (typing.Union, types.UnionType) and len(args) == 1 \
        else field.annotation
    return base if base in (int, float, bool, Path) else str


def option_parameter(model: type[BaseModel], opt: Opt) -> inspect.Parameter:
    """The typer parameter of one option, made from its config field."""
    field = field_of(model, opt.key)
    kind = opt.kind or cli_type(field)
    decls = opt.decls()
    if kind is bool and not any("/" in d for d in decls) and field_default(field) is True:
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]  # a setting that is on: the option must turn it off
    info = typer.Option(*decls, help=help_text(field), show_default=False)
    return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, info])


# The options every stage command shares, declared once.
WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", envvar="BLOGER_WORKSPACE",
                                            help="Workspace directory (catalog + artifacts).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config; its stage section is used.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: key=value "
                                                     "(repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]
LockOpt = Annotated[float, typer.Option("--lock-timeout", help="Seconds to wait for a busy workspace.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="The run (several per workspace, each under "
                                            "runs/NAME/). train-bilevel and baseline: the run to write (default: "
                                            "the workspace's unnamed run); evaluate, recommend, export-model, "
                                            "status: the run to use (default: the latest trained).")]

SHARED: dict[str, tuple[Any, Any]] = {  # parameter -> (annotation, default)
    "workspace": (WorkspaceOpt, DEFAULT_WORKSPACE), "config": (ConfigOpt, None), "set_": (SetOpt, None),
    "as_json": (JsonOpt, False), "force": (ForceOpt, False), "lock_timeout": (LockOpt, 60.0),
    "run": (RunOpt, None),
}


@dataclass
class Invocation:
    """What a command was called with: the shared options, the config options (dotted key -> value or
    None) and the command's own extra parameters."""

    shared: dict[str, Any]
    options: dict[str, Any]
    extra: dict[str, Any]


def command_function(name: str, model: type[BaseModel], opts: list[Opt], body: Callable[[Invocation], None], *,
                     shared: tuple[str, ...], extra: list[inspect.Parameter] = (), doc: str) -> Callable[..., None]:
    """A function typer can register: its signature is the shared options, then `extra`, then one option
    per Opt (made from the config field); calling it collects them into an Invocation for `body`."""
    params = [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=SHARED[p][1], annotation=SHARED[p][0])
              for p in shared]
    params += list(extra)
    params += [option_parameter(model, opt) for opt in opts]
    keys = {opt.param: opt.key for opt in opts}
    extra_names = {p.name for p in extra}

    def command(**kwargs: Any) -> None:
        body(Invocation({k: v for k, v in kwargs.items() if k in shared},
                        {keys[k]: v for k, v in kwargs.items() if k in keys},
                        {k: v for k, v in kwargs.items() if k in extra_names}))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = command.__qualname__ = name.replace("-", "_")
    command.__doc__ = doc
    command.config_model, command.config_options = model, opts  # type: ignore[attr-defined]  (tests walk these)
    return command
