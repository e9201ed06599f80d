"""Shared fixtures: tiny hand-made datasets, the in-process CLI runner, and the real-data location.

`CliRunner()` (Click >= 8.2) keeps stdout and stderr apart: `result.stdout` is what `--json` writes,
`result.stderr` is where rich prints errors and tables, and `result.output` is both, interleaved.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

# Users of 4, 5 and 3 items (12 interactions over items 2, 3, 4, 5, 10): every user can be split
# leave-one-out once the k-core thresholds are lowered to 1 (`--min-user-interactions 1
# --min-item-interactions 1`; the default 5-core removes everything). Item 99 has text but no
# interactions; items 4 and 5 have interactions but no text.
TINY_LETTER = {"0": [10, 2, 3, 4], "1": [2, 3, 4, 10, 5], "2": [3, 2, 10]}
TINY_ITEMS = {
    "2": {"title": "Two", "brand": "B", "categories": [["Beauty", "Nails"], "Polish"]},
    "3": {"title": "Three", "brand": ""},
    "10": {"title": "Ten"},
    "99": {"title": "never bought"},
}
@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets beside the repository (real data; not part of the project)."""
    return SHARED_DATASETS


def require_dataset(name: str) -> Path:
    """The shared dataset folder `name`, or skip the test with the reason."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"../shared/datasets/{name} not found: real-data ground truth skipped")
    return path


@pytest.fixture(scope="session")
def dataset() -> Callable[[str], Path]:
    """`dataset("beauty")` -> the folder, skipping when ../shared/datasets lacks it."""
    return require_dataset


def write_letter(directory: Path, inter: dict[str, list[Any]], items: dict[str, Any] | None = None,
                 name: str = "X") -> Path:
    """Write a LETTER-format dataset (NAME.inter.json [+ NAME.item.json]); returns the interactions file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.inter.json"
    path.write_text(json.dumps(inter, indent=4), encoding="utf-8")
    if items is not None:
        (directory / f"{name}.item.json").write_text(json.dumps(items, indent=4), encoding="utf-8")
    return path


@pytest.fixture
def make_letter(tmp_path: Path) -> Callable[..., Path]:
    """`make_letter({"u": [1, 2, 3]}, items=None, name="X")` -> tmp_path/data/X.inter.json."""
    return lambda inter, items=None, name="X": write_letter(tmp_path / "data", inter, items, name)


@pytest.fixture
def make_csv(tmp_path: Path) -> Callable[[str, str], Path]:
    """`make_csv("t.csv", "user,item\\n1,a")` -> tmp_path/data/t.csv (lines stripped)."""
    return lambda name, text: write_csv(tmp_path / "data" / name, text)


@pytest.fixture
def tiny_letter(tmp_path: Path) -> Path:
    """data/X.inter.json (TINY_LETTER) with data/X.item.json (TINY_ITEMS) beside it."""
    return write_letter(tmp_path / "data", TINY_LETTER, TINY_ITEMS)


def write_csv(path: Path, text: str) -> Path:
    """A CSV file from a dedented literal (first line is the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_workspace_template(tmp_path_factory) -> Path:
    """A workspace after one good `prepare` of the tiny letter set (k-core 1/1); copy it, never modify it."""
    from bloger_cli.config import PrepareConfig
    from bloger_cli.stages import prepare
    from bloger_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("template")
    source = write_letter(root / "data", TINY_LETTER, TINY_ITEMS)
    prepare.run(PrepareConfig(input=source, min_user_interactions=1, min_item_interactions=1),
                Workspace(root / "ws"))
    return root / "ws"


@pytest.fixture
def tiny_workspace(tiny_workspace_template: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared tiny workspace (a copy is much cheaper than a new prepare run)."""
    path = tmp_path / "ws"
    shutil.copytree(tiny_workspace_template, path)
    return path


@pytest.fixture
def cli() -> Callable[..., Any]:
    """`cli("prepare", "--input", path, ...)` runs `bloger` in-process and returns Click's Result.

    The CLI reconfigures the `bloger_cli` logger (rich handler, no propagation); it is restored after
    the test so later tests see the default logging setup.
    """
    from bloger_cli.cli import app

    logger = logging.getLogger("bloger_cli")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    runner = CliRunner()

    def invoke(*args: Any, **kwargs: Any):
        kwargs.setdefault("prog_name", "bloger")
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    yield invoke
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


# ------------------------------------------------------------------------------ embeddings (tokenize)


def write_embeddings(root: Path, vectors: Any) -> None:
    """An honest embeddings artifact: an `embed` run (through the stage runner, items as its parent)
    whose body writes `vectors` (N x D float array, row i = item i) instead of encoding item text."""
    import numpy as np
    import pyarrow as pa

    from bloger_cli.artifacts import write_arrow
    from bloger_cli.config import EmbedConfig
    from bloger_cli.workspace import Workspace, run_stage

    ws = Workspace(root)
    matrix = np.asarray(vectors, dtype=np.float32)

    def body(ctx):
        flat = pa.array(matrix.reshape(-1), pa.float32())
        table = pa.table({"item_id": pa.array(np.arange(len(matrix)), pa.int32()),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])})
        write_arrow(table, ctx.output("embeddings"), ctx.metadata("embeddings", {"model": "test-vectors"}))
        return {"items": len(matrix), "dim": int(matrix.shape[1])}

    run_stage(ws, "embed", EmbedConfig(), {"artifact:items": ws.info("items", with_hash=True).content_hash},
              body, force=True)


@pytest.fixture(scope="session")
def items64_workspace_template(tmp_path_factory) -> Path:
    """A prepared synthetic workspace of 64 items (k-core 1/1); copy it, never modify it."""
    from bloger_cli.config import PrepareConfig, SyntheticConfig
    from bloger_cli.stages import prepare
    from bloger_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("items64") / "ws"
    synthetic = SyntheticConfig(users=100, items=64, categories=8, interactions=1000)
    prepare.run(PrepareConfig(source="synthetic", synthetic=synthetic, min_user_interactions=1,
                              min_item_interactions=1), Workspace(root))
    return root


@pytest.fixture
def items64_workspace(items64_workspace_template: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared 64-item synthetic workspace (no embeddings yet: see write_embeddings)."""
    path = tmp_path / "ws64"
    shutil.copytree(items64_workspace_template, path)
    return path


@pytest.fixture
def make_embeddings() -> Callable[[Path, Any], None]:
    """`make_embeddings(workspace_root, vectors)`: see write_embeddings (a fixture, so tests need not import
    conftest, which stops working as a plain module once tests/ is a package)."""
    return write_embeddings


# ------------------------------------------------------------------------------ importers


def import_source(source: str, input: Path, items: Path | None = None) -> None:
    """Resolve and import only, no workspace: fast, for error cases (`prepare.run` re-raises them unchanged)."""
    import duckdb

    from bloger_cli.config import PrepareConfig
    from bloger_cli.data import importers

    cfg = PrepareConfig(source=source, input=input, items=items)
    files = importers.resolve_source(cfg)
    con = duckdb.connect()
    try:
        importers.SOURCES[cfg.source][1](con, cfg, files)
    finally:
        con.close()


def exactly(message: str) -> str:
    """A pytest.raises(match=...) pattern for exactly this message."""
    import re

    return f"^{re.escape(message)}$"


# ------------------------------------------------------------------------------ training


TINY_MODEL = ["--set", "model.d_model=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
              "--set", "model.d_kv=8", "--set", "model.d_ff=32", "--set", "model.dropout=0.0"]


def tiny_train_config(**overrides: Any):
    """A train-bilevel config with a model small enough for unit tests (1 layer, d 16)."""
    from bloger_cli.config import ModelConfig, TrainBilevelConfig

    model = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, dropout=0.0)
    values = {"mode": "fixed", "epochs": 2, "batch_size": 64, "device": "cpu", "model": model, **overrides}
    return TrainBilevelConfig(**values)


@pytest.fixture(scope="session")
def tokenized_workspace_template(items64_workspace_template: Path, tmp_path_factory) -> Path:
    """The 64-item synthetic workspace with random 16-d embeddings and 2 x 16 residual k-means IDs."""
    import numpy as np

    from bloger_cli.config import TokenizeConfig
    from bloger_cli.stages import tokenize
    from bloger_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("tokenized") / "ws"
    shutil.copytree(items64_workspace_template, root)
    write_embeddings(root, np.random.default_rng(0).normal(size=(64, 16)))
    tokenize.run(TokenizeConfig(method="rq-kmeans", levels=2, codebook_size=16, device="cpu"), Workspace(root))
    return root


@pytest.fixture(scope="session")
def rqvae_workspace_template(items64_workspace_template: Path, tmp_path_factory) -> Path:
    """The 64-item workspace tokenized by a small RQ-VAE (2 x 16 codes): modes joint and bilevel need one."""
    import numpy as np

    from bloger_cli.config import TokenizeConfig
    from bloger_cli.stages import tokenize
    from bloger_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("rqvae") / "ws"
    shutil.copytree(items64_workspace_template, root)
    write_embeddings(root, np.random.default_rng(0).normal(size=(64, 16)))
    tokenize.run(TokenizeConfig(method="rqvae", levels=2, codebook_size=16, epochs=20, hidden=[16],
                                code_dim=8, device="cpu"), Workspace(root))
    return root


@pytest.fixture
def rqvae_workspace(rqvae_workspace_template: Path, tmp_path: Path) -> Path:
    """A private copy of the RQ-VAE-tokenized 64-item workspace."""
    path = tmp_path / "rqvae"
    shutil.copytree(rqvae_workspace_template, path)
    return path


@pytest.fixture
def tokenized_workspace(tokenized_workspace_template: Path, tmp_path: Path) -> Path:
    """A private copy of the tokenized 64-item workspace (ready for train-bilevel)."""
    path = tmp_path / "tok"
    shutil.copytree(tokenized_workspace_template, path)
    return path


@pytest.fixture(scope="session")
def trained_workspace_template(tokenized_workspace_template: Path, tmp_path_factory) -> Path:
    """The tokenized workspace after a 2-epoch train-bilevel run of a tiny model (mode fixed)."""
    from bloger_cli.stages import train
    from bloger_cli.workspace import Workspace

    root = tmp_path_factory.mktemp("trained") / "ws"
    shutil.copytree(tokenized_workspace_template, root)
    train.run(tiny_train_config(), Workspace(root))
    return root


@pytest.fixture
def trained_workspace(trained_workspace_template: Path, tmp_path: Path) -> Path:
    """A private copy of the trained tiny workspace (ready for evaluate and export-ids --from train)."""
    path = tmp_path / "trained"
    shutil.copytree(trained_workspace_template, path)
    return path


@pytest.fixture
def train_config() -> Callable[..., Any]:
    """`train_config(epochs=3, ...)`: see tiny_train_config."""
    return tiny_train_config


# ------------------------------------------------------------------------------ faults


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (the lock file aside) -> sha256 of its bytes: "nothing touched" is equality."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".bloger.lock"}


@pytest.fixture
def fails_cleanly(cli) -> Callable[..., str]:
    """`fails_cleanly(workspace, code, "train-bilevel", "-w", ws, ...)` runs the command and checks that
    it exits with `code`, prints no traceback and one `error:` line (then at most a hint, or a config's
    bullets), and
    leaves every file under `workspace` (but those named in `ignore`) byte for byte as it was; returns the error
    line and hint joined
    by a newline."""

    def run(workspace: Path, code: int, *args: Any, ignore: tuple[str, ...] = (), **kwargs: Any) -> str:
        def digest() -> dict[str, str] | None:
            return {k: v for k, v in tree_digest(workspace).items() if k not in ignore} if workspace.exists() else None

        before = digest()
        out = cli(*args, **kwargs)
        assert out.exit_code == code, (out.exit_code, out.output, out.exception)
        assert "Traceback" not in out.output and not isinstance(out.exception, AssertionError)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
        assert len(errors) == 1, out.stderr
        message = lines[errors[0]:]
        # the error line, then a hint, or one bullet per invalid field of a config
        assert all(line.startswith(("  • ", "  hint: ")) for line in message[1:]), out.stderr
        assert sum(line.startswith("  hint: ") for line in message) <= 1, out.stderr
        assert digest() == before, "the workspace changed"
        return "\n".join(message)

    return run
