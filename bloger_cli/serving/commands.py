"""The serving commands, `bloger recommend` and `bloger export-model`, on the app of bloger_cli.cli (which
imports this module at its end so that they are registered)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bloger_cli.cli import ConfigOpt, JsonOpt, SetOpt, WorkspaceOpt, app
from bloger_cli.config import resolve_config
from bloger_cli.render import emit, render_generic
from bloger_cli.workspace import DEFAULT_WORKSPACE, Workspace

OverwriteOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out.")]


@app.command()
def recommend(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: OverwriteOpt = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file: .parquet, .csv or .jsonl.")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Items per user [10].")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint to serve [WORKSPACE/best.pt].")] = None,
    model: Annotated[Path | None, typer.Option(
        help="A `bloger export-model` file: serve --histories without a workspace.")] = None,
    users: Annotated[Path | None, typer.Option(help="File of user keys, one a line [every user].")] = None,
    histories: Annotated[Path | None, typer.Option(
        help="Parquet or JSONL of new histories: user_key, items: [item_key, ...].")] = None,
    as_of: Annotated[str | None, typer.Option(
        help="test | valid: cut histories where evaluate does [the whole sequence].")] = None,
    exclude_seen: Annotated[bool | None, typer.Option(
        "--exclude-seen/--no-exclude-seen", help="Leave out items the user already has [on].")] = None,
    beam: Annotated[int | None, typer.Option(help="Beam width, widened to K + seen items [20].")] = None,
    decode: Annotated[str | None, typer.Option(help="beam | exact (score every item) [beam].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Users per decoding batch [256].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps.")] = None,
    with_titles: Annotated[bool | None, typer.Option(
        "--with-titles", help="Add the item title (when the items have one).")] = None,
) -> None:
    """Write the top-K items for every user (or --users, or new --histories) with the trained model."""
    from bloger_cli.stages.recommend import run

    options = dict(out=out, k=k, checkpoint=checkpoint, model=model, users=users, histories=histories,
                   as_of=as_of, exclude_seen=exclude_seen, beam=beam, decode=decode, batch_size=batch_size,
                   device=device, with_titles=with_titles)
    cfg = resolve_config("recommend", config, options, set_)
    result = run(cfg, None if cfg.model is not None else Workspace(workspace), force=force)
    emit({"stage": "recommend", "skipped": False, "result": result}, as_json, render_generic)


@app.command("export-model")
def export_model(
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: OverwriteOpt = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="torch: a file; hf: a folder.")] = None,
    format: Annotated[str | None, typer.Option(
        help="torch (one file for `recommend --model`) | hf (a transformers folder) [torch].")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint to export [WORKSPACE/best.pt].")] = None,
) -> None:
    """Export the trained model, its semantic IDs and vocabulary for serving (one file, or a HF folder)."""
    from bloger_cli.stages.export_model import run

    cfg = resolve_config("export-model", config, dict(out=out, format=format, checkpoint=checkpoint), set_)
    result = run(cfg, Workspace(workspace), force=force)
    emit({"stage": "export-model", "skipped": False, "result": result}, as_json, render_generic)
