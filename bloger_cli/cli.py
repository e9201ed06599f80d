"""The `bloger` command line: thin commands over the library, one error boundary.

Each stage command resolves its config (file -> options -> --set), calls one library function and
renders the result: a rich table on stderr, or one JSON object on stdout with --json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from bloger_cli import __version__, progress
from bloger_cli.config import resolve_config
from bloger_cli.errors import BlogerError, Interrupted, WorkspaceError
from bloger_cli.render import RENDERERS, emit, err, render_report, render_runs
from bloger_cli.workspace import DEFAULT_WORKSPACE, Workspace, stage_status

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

    def invoke(self, ctx: typer.Context) -> Any:
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
    cls=BoundaryGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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


# Options every stage command shares.
WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", envvar="BLOGER_WORKSPACE",
                                            help="Workspace directory (catalog + artifacts).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config; its stage section is used.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: key=value (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]
LockOpt = Annotated[float, typer.Option("--lock-timeout", help="Seconds to wait for a busy workspace.")]


@app.command()
def prepare(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lock_timeout: LockOpt = 60.0,
    source: Annotated[str | None, typer.Option(
        help="letter | amazon | amazon2023 | movielens | recbole | table | synthetic")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Interactions file or source directory.")] = None,
    items: Annotated[Path | None, typer.Option(help="Item metadata file (default: found beside the input).")] = None,
    user_col: Annotated[str | None, typer.Option(help="table: user column.")] = None,
    item_col: Annotated[str | None, typer.Option(help="table: item column.")] = None,
    time_col: Annotated[str | None, typer.Option(help="table: timestamp column.")] = None,
    rating_col: Annotated[str | None, typer.Option(help="table: rating column.")] = None,
    item_key_col: Annotated[str | None, typer.Option(help="table: item key column in --items.")] = None,
    min_rating: Annotated[float | None, typer.Option(help="Keep interactions rated at least this.")] = None,
    duplicates: Annotated[str | None, typer.Option(help="Repeated (user, item): first | all.")] = None,
    min_user_interactions: Annotated[int | None, typer.Option(help="k-core threshold for users [5].")] = None,
    min_item_interactions: Annotated[int | None, typer.Option(help="k-core threshold for items [5].")] = None,
    max_history: Annotated[int | None, typer.Option(help="History length of each sample [20].")] = None,
) -> None:
    """Turn raw interactions (+ item text) into interactions, users, items and sequences artifacts."""
    from bloger_cli.stages.prepare import run

    options = dict(source=source, input=input, items=items, user_col=user_col, item_col=item_col,
                   time_col=time_col, rating_col=rating_col, item_key_col=item_key_col, min_rating=min_rating,
                   duplicates=duplicates, min_user_interactions=min_user_interactions,
                   min_item_interactions=min_item_interactions, max_history=max_history)
    _stage("prepare", run, workspace, config, options, set_, as_json, force, lock_timeout)


@app.command()
def embed(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lock_timeout: LockOpt = 60.0,
    model: Annotated[str | None, typer.Option(
        help="sentence-transformers model name or local directory [all-MiniLM-L6-v2].")] = None,
    template: Annotated[str | None, typer.Option(
        help="Text template over item fields, e.g. '{title}. Brand: {brand}. {categories}'.")] = None,
    on_missing_text: Annotated[str | None, typer.Option(
        help="Items with no text: error | skip | empty.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Texts per encoder batch [128].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
    from_file: Annotated[Path | None, typer.Option(
        help="Import a precomputed matrix (.npy rows in item_id order, or .parquet item_id + embedding).")] = None,
) -> None:
    """Encode each item's text into an embedding (cached by text hash, so re-runs encode only new text)."""
    from bloger_cli.stages.embed import run

    options = dict(model=model, template=template, on_missing_text=on_missing_text, batch_size=batch_size,
                   device=device, from_file=from_file)
    _stage("embed", run, workspace, config, options, set_, as_json, force, lock_timeout)


@app.command()
def tokenize(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lock_timeout: LockOpt = 60.0,
    method: Annotated[str | None, typer.Option(help="rqvae | rq-kmeans.")] = None,
    levels: Annotated[int | None, typer.Option(help="Residual levels L [4].")] = None,
    codebook_size: Annotated[int | None, typer.Option(help="Codes per level K [256].")] = None,
    epochs: Annotated[int | None, typer.Option(help="RQ-VAE training epochs [200].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [42].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
    warm_start: Annotated[Path | None, typer.Option(
        help="An earlier workspace or tokenizer file to start from (then --epochs more; 0: codes only).")] = None,
) -> None:
    """Train the item tokenizer and give every item a semantic ID (collisions disambiguated)."""
    from bloger_cli.stages.tokenize import run

    options = dict(method=method, levels=levels, codebook_size=codebook_size, epochs=epochs, seed=seed,
                   device=device, warm_start=warm_start)
    _stage("tokenize", run, workspace, config, options, set_, as_json, force, lock_timeout)


@app.command("train-bilevel")
def train_bilevel(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lock_timeout: LockOpt = 60.0,
    mode: Annotated[str | None, typer.Option(
        help="fixed (tokenizer frozen, TIGER) | joint | bilevel (BLOGER) [bilevel].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs [200].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training samples per step [256].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [42].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
    val_users: Annotated[int | None, typer.Option(
        help="Validate on a fixed sample of this many users [all].")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="Weight of the tokenizer loss [0.5].")] = None,
    surgery: Annotated[str | None, typer.Option(help="pcgrad | none | official [pcgrad].")] = None,
    updates_per_epoch: Annotated[int | None, typer.Option(help="Tokenizer meta steps per epoch [1].")] = None,
    time_budget: Annotated[str | None, typer.Option(
        help="Stop after this much wall time, e.g. 90s, 20m, 1h30m; the schedule spans it [none].")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps [none].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run of this workspace.")] = False,
    warm_start: Annotated[Path | None, typer.Option(
        help="An earlier workspace or checkpoint whose recommender weights to start from.")] = None,
) -> None:
    """Train the generative recommender (and, in modes joint and bilevel, the tokenizer) on the semantic IDs.

    Other settings via --set model.X, train.X and bilevel.X."""
    from bloger_cli.stages.train import run

    options = {"mode": mode, "epochs": epochs, "batch_size": batch_size, "seed": seed, "device": device,
               "train.val_users": val_users, "bilevel.lam": lam, "bilevel.surgery": surgery,
               "bilevel.updates_per_epoch": updates_per_epoch, "warm_start": warm_start,
               "train.time_budget": time_budget, "train.max_steps": max_steps}
    _stage("train-bilevel", run, workspace, config, options, set_, as_json, force, lock_timeout, resume=resume)


@app.command()
def evaluate(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lock_timeout: LockOpt = 60.0,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint to evaluate [WORKSPACE/best.pt].")] = None,
    split: Annotated[str | None, typer.Option(help="test | valid [test].")] = None,
    k: Annotated[str | None, typer.Option("--k", help="Cut-offs, comma-separated [1,5,10,20].")] = None,
    beam: Annotated[int | None, typer.Option(help="Beam width of constrained decoding [20].")] = None,
    decode: Annotated[str | None, typer.Option(help="beam | exact (score every item; small catalogs) [beam].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Users per decoding batch [256].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
) -> None:
    """Decode held-out users and report Recall@K and NDCG@K (item-level), beside a popularity baseline."""
    from bloger_cli.stages.evaluate import run

    options = dict(checkpoint=checkpoint, split=split, k=k, beam=beam, decode=decode, batch_size=batch_size,
                   device=device)
    _stage("evaluate", run, workspace, config, options, set_, as_json, force, lock_timeout)


@app.command()
def baseline(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    lock_timeout: LockOpt = 60.0,
    model: Annotated[str | None, typer.Option("--model", help="sasrec | popularity [sasrec].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum SASRec epochs [200].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training samples per step [256].")] = None,
    patience: Annotated[int | None, typer.Option(help="Epochs without a better validation NDCG@10 [10].")] = None,
    k: Annotated[str | None, typer.Option("--k", help="Cut-offs, comma-separated [1,5,10,20].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [42].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
) -> None:
    """Train and test a baseline (SASRec, or popularity) on the workspace's own split and metrics.

    SASRec settings via --set sasrec.X (layers, heads, hidden, inner, dropout, lr, weight_decay)."""
    from bloger_cli.stages.baseline import run

    options = dict(model=model, epochs=epochs, batch_size=batch_size, patience=patience, k=k, seed=seed,
                   device=device)
    _stage("baseline", run, workspace, config, options, set_, as_json, force, lock_timeout)


@app.command("export-ids")
def export_ids(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    lock_timeout: LockOpt = 60.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file.")] = None,
    format: Annotated[str | None, typer.Option(help="parquet | csv | jsonl [from the suffix].")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="tokenize | train [tokenize].")] = None,
    codebooks: Annotated[Path | None, typer.Option(help="Also write the codebooks (level, code, vector).")] = None,
    compare: Annotated[Path | None, typer.Option(help="An earlier export: count items whose ID changed.")] = None,
) -> None:
    """Export item key, item id and semantic ID (Parquet, CSV or JSONL)."""
    from bloger_cli.stages.export import run

    options = dict(out=out, format=format, from_=from_, codebooks=codebooks, compare=compare)
    _stage("export-ids", run, workspace, config, options, set_, as_json, True, lock_timeout)


def _stage(stage: str, run, workspace: Path, config: Path | None, options: dict[str, Any], sets: list[str] | None,
           as_json: bool, force: bool, lock_timeout: float, **extra: Any) -> None:
    """What every stage command does: resolve the config, run the library function, render."""
    cfg = resolve_config(stage, config, options, sets)
    out = run(cfg, Workspace(workspace), force=force, lock_timeout=lock_timeout, **extra)
    if not out.run_id:  # a torchrun process other than rank 0: rank 0 reports
        return
    payload = {"stage": stage, "run_id": out.run_id, "skipped": out.skipped, "result": out.result}
    if "metrics" in out.result:  # evaluate: `jq .metrics` gives {"recall@10": ...} directly
        payload["metrics"] = out.result["metrics"]
    emit(payload, as_json, RENDERERS[stage])


@app.command()
def status(workspace: WorkspaceOpt = DEFAULT_WORKSPACE, as_json: JsonOpt = False) -> None:
    """List each stage of a workspace as done, stale or missing."""
    ws = Workspace(workspace)
    if not ws.catalog.path.exists():
        raise WorkspaceError(f"{workspace} is not a bloger workspace (no catalog.duckdb)",
                             hint="run `bloger prepare` first")
    rows = stage_status(ws)

    def render(result: dict[str, Any]) -> None:
        table = Table(title=f"workspace {workspace}", title_justify="left")
        for col in ("stage", "state", "reason", "last run"):
            table.add_column(col)
        colour = {"done": "green", "stale": "yellow", "missing": "red"}
        for r in result["stages"]:
            table.add_row(r["stage"], f"[{colour[r['state']]}]{r['state']}[/]", escape(r["reason"]),
                          r["run_id"] or "")
        err.print(table)

    emit({"workspace": str(workspace), "stages": rows}, as_json, render)


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


@app.command()
def report(
    workspace: Annotated[list[Path] | None, typer.Option(
        "--workspace", "-w", envvar="BLOGER_WORKSPACE",
        help="Workspace whose runs to report (repeatable: several side by side).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory [WORKSPACE/report].")] = None,
    name: Annotated[str | None, typer.Option(help="Title (and the results file's name).")] = None,
    results: Annotated[Path | None, typer.Option(
        help="Also write RESULTS/NAME.md and .json, the reproduction results file of `make -C pipelines`.")] = None,
    train_flags: Annotated[str | None, typer.Option(help="TRAIN_FLAGS the runs were made with, to record.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into an output directory that exists.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write an HTML report with figures: training curves, tokenizer updates, codebook usage, test metrics
    of every run and baseline (mean ± 95% interval over seeds), and the configs that differ. Needs
    matplotlib, the `plot` extra of bloger."""
    from bloger_cli.stages.report import run

    roots = workspace or [DEFAULT_WORKSPACE]
    options = dict(out=out or roots[0] / "report", name=name, results=results, train_flags=train_flags)
    result = run(resolve_config("report", config, options, set_), roots, force=force)
    emit(result, as_json, render_report)


def main() -> None:
    """Console-script entry point."""
    app()


from bloger_cli.serving import commands as _serving_commands  # noqa: E402,F401  registers recommend, export-model
