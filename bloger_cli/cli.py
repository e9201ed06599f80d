"""The `bloger` command line: thin commands over the library, one error boundary.

Each stage command resolves its config (file -> options -> --set), calls one library function and
renders the result: a rich table on stderr, or one JSON object on stdout with --json.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from typer import _click as click  # typer 0.29 vendors click: its Context is this one
from typer.core import TyperGroup

from bloger_cli import __version__, progress
from bloger_cli.config import resolve_config, stage_config
from bloger_cli.errors import BlogerError, Interrupted, WorkspaceError
from bloger_cli.options import Invocation, JsonOpt, LockOpt, Opt, RunOpt, WorkspaceOpt, command_function
from bloger_cli.render import RENDERERS, emit, err, render_generic, render_report, render_runs
from bloger_cli.report.config import ReportConfig
from bloger_cli.status import problems, stage_status
from bloger_cli.status import repair as repair_workspace
from bloger_cli.workspace import DEFAULT_WORKSPACE, Workspace

_state = {"debug": False}


def format_validation_error(exc: ValidationError, stage: str) -> str:
    """One bullet per invalid field, named as the user would write it in --set."""
    lines = [f"invalid {stage} config ({exc.error_count()} error{'s' if exc.error_count() > 1 else ''}):"]
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or stage
        if e["type"] == "extra_forbidden":
            lines.append(f"  • {loc}: unknown key (check the spelling; `bloger {stage} --help` lists options)")
        else:
            given = f" (got {e['input']!r})" if e["type"] not in ("value_error", "missing") else ""
            lines.append(f"  • {loc}: {e['msg'].removeprefix('Value error, ')}{given}")
    return "\n".join(lines)


class BoundaryGroup(TyperGroup):
    """The one error boundary: expected errors become a red line and an exit code, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BlogerError as exc:
            if _state["debug"]:
                raise
            # escape(): messages hold user text ("[prepare]", "{user: [item, ...]}") that is not markup
            label = "[bold yellow]stopped:[/]" if isinstance(exc, Interrupted) else "[bold red]error:[/]"
            err.print(f"{label} {escape(exc.message)}", markup=True, highlight=False, soft_wrap=True)
            if exc.hint:
                err.print(f"  hint: {escape(exc.hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except ValidationError as exc:
            if _state["debug"]:
                raise
            stage = ctx.invoked_subcommand or "bloger"
            err.print(f"[bold red]error:[/] {escape(format_validation_error(exc, stage))}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=BoundaryGroup, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    help="bloger: generative recommenders with BLOGER bi-level tokenizer/recommender training.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bloger {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step (stderr).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors; no progress bars.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Debug logs and full tracebacks.")] = False,
) -> None:
    """Stages: prepare -> embed -> tokenize -> train-bilevel -> evaluate -> export-ids; then recommend,
    export-model, baseline, runs, report."""
    _state["debug"] = debug
    quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 alone speaks
    progress.set_quiet(quiet)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    root = logging.getLogger("bloger_cli")
    root.handlers[:] = [RichHandler(console=err, show_path=debug, show_time=False, markup=False)]
    root.setLevel(level)
    root.propagate = False


# ------------------------------------------------------------------------------------ stage commands
# Each command names the config fields it offers as options; their flags, types, help and defaults come
# from the fields (bloger_cli/options.py). Every other field is reachable with --set. The stage modules
# are imported when a command runs, so that `bloger --help` does not load torch.

STAGE_SHARED = ("workspace", "config", "set_", "as_json", "force", "lock_timeout")
RUN_SHARED = (*STAGE_SHARED, "run")  # the stages whose outputs belong to a run (runs/NAME/)


def stage_command(name: str, module: str, opts: list[Opt], doc: str, *, shared: tuple[str, ...] = STAGE_SHARED,
                  extra: Sequence[inspect.Parameter] = (), force: bool | None = None) -> None:
    """Register `bloger NAME`: resolve the config, run `bloger_cli.stages.MODULE.run`, render."""
    model = stage_config(name)

    def body(call: Invocation) -> None:
        run = importlib.import_module(f"bloger_cli.stages.{module}").run
        s = call.shared
        _stage(name, run, Workspace(s["workspace"], s.get("run")), s["config"], call.options, s["set_"],
               s["as_json"], s.get("force", False) if force is None else force, s["lock_timeout"], **call.extra)

    app.command(name)(command_function(name, model, opts, body, shared=shared, extra=extra, doc=doc))


def flag(name: str, decl: str, help: str) -> inspect.Parameter:
    """A command's own on/off switch that is not a config setting (--resume)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                             annotation=Annotated[bool, typer.Option(decl, help=help)])


stage_command("prepare", "prepare", [
    Opt("source"), Opt("input", ("--input", "-i")), Opt("items"), Opt("user_col"), Opt("item_col"),
    Opt("time_col"), Opt("rating_col"), Opt("item_key_col"), Opt("min_rating"), Opt("duplicates"),
    Opt("min_user_interactions"), Opt("min_item_interactions"), Opt("max_history"),
], "Turn raw interactions (+ item text) into interactions, users, items and sequences artifacts.")

stage_command("embed", "embed", [
    Opt("model"), Opt("template"), Opt("on_missing_text"), Opt("batch_size"), Opt("device"), Opt("from_file"),
], "Encode each item's text into an embedding (cached by text hash, so re-runs encode only new text).")

stage_command("tokenize", "tokenize", [
    Opt("method"), Opt("levels"), Opt("codebook_size"), Opt("epochs"), Opt("seed"), Opt("device"),
    Opt("warm_start"),
], "Train the item tokenizer and give every item a semantic ID (collisions disambiguated).")

stage_command("train-bilevel", "train", [
    Opt("mode"), Opt("epochs"), Opt("batch_size"), Opt("seed"), Opt("device"), Opt("train.val_users"),
    Opt("bilevel.lam", ("--lambda",)), Opt("bilevel.surgery"), Opt("bilevel.updates_per_epoch"),
    Opt("train.time_budget", kind=str), Opt("train.max_steps"), Opt("warm_start"),
], "Train the generative recommender (and, in modes joint and bilevel, the tokenizer) on the semantic "
   "IDs.\n\nOther settings via --set model.X, train.X and bilevel.X.", shared=RUN_SHARED,
    extra=[flag("resume", "--resume", "Continue the interrupted run of this workspace.")])

stage_command("evaluate", "evaluate", [
    Opt("checkpoint"), Opt("split"), Opt("k", ("--k",)), Opt("beam"), Opt("decode"), Opt("batch_size"),
    Opt("device"),
], "Decode held-out users and report Recall@K and NDCG@K (item-level), beside a popularity baseline.",
    shared=RUN_SHARED)

stage_command("baseline", "baseline", [
    Opt("model", ("--model",)), Opt("epochs"), Opt("time_budget", kind=str), Opt("batch_size"), Opt("patience"),
    Opt("k", ("--k",)), Opt("seed"), Opt("device"),
], "Train and test a baseline (SASRec, or popularity) on the workspace's own split and metrics.\n\n"
   "SASRec settings via --set sasrec.X (layers, heads, hidden, inner, dropout, lr, weight_decay).",
    shared=RUN_SHARED)

stage_command("export-ids", "export", [
    Opt("out", ("--out", "-o")), Opt("format"), Opt("from_", ("--from",)), Opt("codebooks"), Opt("compare"),
], "Export item key, item id and semantic ID (Parquet, CSV or JSONL).",
    shared=("workspace", "config", "set_", "as_json", "lock_timeout"), force=True)


def _stage(stage: str, run: Callable[..., Any], ws: Workspace, config: Path | None, options: dict[str, Any],
           sets: list[str] | None, as_json: bool, force: bool, lock_timeout: float, **extra: Any) -> None:
    """What every stage command does: resolve the config, run the library function, render."""
    cfg = resolve_config(stage, config, options, sets)
    out = run(cfg, ws, force=force, lock_timeout=lock_timeout, **extra)
    if not out.run_id:  # a torchrun process other than rank 0: rank 0 reports
        return
    payload = {"stage": stage, "run_id": out.run_id, "skipped": out.skipped, "result": out.result}
    if "metrics" in out.result:  # evaluate: `jq .metrics` gives {"recall@10": ...} directly
        payload["metrics"] = out.result["metrics"]
    emit(payload, as_json, RENDERERS[stage])


# ------------------------------------------------------------------------------ serving commands

ReplaceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out.")]
SERVING_SHARED = ("workspace", "config", "set_", "as_json", "run")


def serving_command(name: str, module: str, opts: list[Opt], doc: str) -> None:
    """Register `bloger NAME` for a command that writes a file outside the workspace (no stage run)."""
    model = stage_config(name)
    replace = inspect.Parameter("replace", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ReplaceOpt)

    def body(call: Invocation) -> None:
        run = importlib.import_module(f"bloger_cli.stages.{module}").run
        cfg = resolve_config(name, call.shared["config"], call.options, call.shared["set_"])
        ws = None if getattr(cfg, "model", None) is not None else \
            Workspace(call.shared["workspace"], call.shared["run"])
        result = run(cfg, ws, force=call.extra["replace"])
        emit({"stage": name, "skipped": False, "result": result}, call.shared["as_json"], render_generic)

    app.command(name)(command_function(name, model, opts, body, shared=SERVING_SHARED, extra=[replace], doc=doc))


serving_command("recommend", "recommend", [
    Opt("out", ("--out", "-o")), Opt("k", ("--k",)), Opt("checkpoint"), Opt("model"), Opt("users"),
    Opt("histories"), Opt("as_of"), Opt("exclude_seen"), Opt("beam"), Opt("decode"), Opt("batch_size"),
    Opt("device"), Opt("with_titles"),
], "Write the top-K items for every user (or --users, or new --histories) with the trained model.")

serving_command("export-model", "export_model", [
    Opt("out", ("--out", "-o")), Opt("format"), Opt("checkpoint"),
], "Export the trained model, its semantic IDs and vocabulary for serving (one file, or a HF folder).")


# ------------------------------------------------------------------------- workspace commands

@app.command()
def status(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    run: RunOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what a killed process left: finish a commit it "
                                         "decided, mark its runs killed, remove its temporary files.")] = False,
    lock_timeout: LockOpt = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """List each stage of a workspace (and of its latest run, or --run) as done, stale or missing, and
    anything a killed process left behind."""
    ws = Workspace(workspace, run)
    if not ws.catalog.path.exists():
        raise WorkspaceError(f"{workspace} is not a bloger workspace (no catalog.duckdb)",
                             hint="run `bloger prepare` first")
    repaired = repair_workspace(ws, lock_timeout) if repair else []
    left = problems(ws)
    ws = ws.latest_run()
    rows = stage_status(ws)

    def render(result: dict[str, Any]) -> None:
        table = Table(title=f"workspace {workspace}" + (f", run {ws.run}" if ws.run else ""), title_justify="left")
        for col in ("stage", "state", "reason", "last run"):
            table.add_column(col)
        colour = {"done": "green", "stale": "yellow", "missing": "red"}
        for r in result["stages"]:
            table.add_row(r["stage"], f"[{colour[r['state']]}]{r['state']}[/]", escape(r["reason"]),
                          r["run_id"] or "")
        err.print(table)
        for line in result["repaired"]:
            err.print(f"[green]repaired:[/] {escape(line)}", highlight=False)
        for line in result["problems"]:
            err.print(f"[yellow]left over:[/] {escape(line)}", highlight=False)
        if result["problems"]:
            err.print(f"  hint: `bloger status -w {workspace} --repair` fixes these", highlight=False)

    emit({"workspace": str(workspace), "run": ws.run, "stages": rows, "problems": left, "repaired": repaired},
         as_json, render)


@app.command()
def runs(
    workspace: Annotated[list[Path] | None, typer.Option(
        "--workspace", "-w", envvar="BLOGER_WORKSPACE",
        help="Workspace to list (repeatable: several side by side).")] = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage's runs.")] = None,
    mode: Annotated[str | None, typer.Option(help="Only runs of this mode: fixed, joint or bilevel.")] = None,
    run_status: Annotated[str | None, typer.Option("--status", help="Only runs with this status: "
                                                      "done, failed, interrupted, running or killed.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the stage runs recorded in one or several workspaces: mode, seed, config, status, metrics."""
    from bloger_cli.runs import list_runs

    roots = workspace or [DEFAULT_WORKSPACE]
    rows = list_runs(roots, stage=stage, mode=mode, status=run_status)

    emit({"workspaces": [str(r) for r in roots], "runs": rows}, as_json, render_runs)


ReportWorkspaces = Annotated[list[Path] | None, typer.Option(
    "--workspace", "-w", envvar="BLOGER_WORKSPACE", help="Workspace whose runs to report (repeatable: several "
    "side by side).")]
ReportForce = Annotated[bool, typer.Option("--force", help="Write into an output directory that exists.")]


def _report(call: Invocation) -> None:
    from bloger_cli.stages.report import run

    roots = call.extra["workspaces"] or [DEFAULT_WORKSPACE]
    options = {**call.options, "out": call.options["out"] or roots[0] / "report"}
    cfg = resolve_config("report", call.shared["config"], options, call.shared["set_"])
    assert isinstance(cfg, ReportConfig)
    result = run(cfg, roots, force=call.extra["replace"])
    emit(result, call.shared["as_json"], render_report)


app.command("report")(command_function(
    "report", stage_config("report"), [Opt("out", ("--out", "-o")), Opt("name"), Opt("results"), Opt("train_flags")],
    _report, shared=("config", "set_", "as_json"),
    extra=[inspect.Parameter("workspaces", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ReportWorkspaces),
           inspect.Parameter("replace", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ReportForce)],
    doc="Write an HTML report with figures: training curves, tokenizer updates, codebook usage, test metrics "
        "of every run and baseline (mean ± 95% interval over seeds), and the configs that differ. Needs "
        "matplotlib, the `plot` extra of bloger."))


def main() -> None:
    """Console-script entry point."""
    app()

