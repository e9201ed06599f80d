"""Same seed, same data, same device (CPU): the tiny pipeline run twice gives bit-identical semantic
IDs, checkpoint metrics and `bloger recommend` output (DESIGN.md section 6; README says what differs on
a GPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL

TOKENIZE = ["--method", "rqvae", "--levels", "2", "--codebook-size", "16", "--epochs", "10", "--seed", "3",
            "--device", "cpu", "--set", "hidden=[16]", "--set", "code_dim=8"]
TRAIN = ["--mode", "bilevel", "--epochs", "1", "--batch-size", "64", "--seed", "3", "--device", "cpu", *TINY_MODEL,
         "--set", "bilevel.tokenizer_lr=0.05"]


def pipeline(cli, root: Path, make_embeddings) -> dict[str, object]:
    make_embeddings(root, np.random.default_rng(0).normal(size=(64, 16)))
    for args in (["tokenize", *TOKENIZE], ["train-bilevel", *TRAIN], ["evaluate", "--device", "cpu"],
                 ["recommend", "--out", root.parent / f"{root.name}.csv"]):
        out = cli(args[0], "-w", root, *args[1:])
        assert out.exit_code == 0, out.output
    from bloger_cli.training.checkpoint import load_checkpoint

    best = load_checkpoint(root / "best.pt")
    return {
        "semantic_ids": pq.read_table(root / "semantic_ids.parquet").to_pylist(),
        "trained_semantic_ids": pq.read_table(root / "trained_semantic_ids.parquet").to_pylist(),
        "best": (best["step"], best["best"], best["history"]),
        "metrics": pq.read_table(root / "metrics.parquet").drop(["run_id"]).to_pylist(),
        "recommend": (root.parent / f"{root.name}.csv").read_bytes(),
    }


@pytest.mark.slow
def test_same_seed_gives_bit_identical_ids_metrics_and_recommendations(items64_workspace_template: Path,
                                                                       tmp_path: Path, cli, make_embeddings):
    runs = []
    for name in ("a", "b"):
        shutil.copytree(items64_workspace_template, tmp_path / name)
        runs.append(pipeline(cli, tmp_path / name, make_embeddings))
    first, second = runs
    for key in first:
        if key == "best":  # the history's wall-clock seconds differ; everything else must not
            def strip(rows):
                return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s", "elapsed")}
                        for r in rows]
            assert first[key][:2] == second[key][:2]
            assert strip(first[key][2]) == strip(second[key][2])
        else:
            assert first[key] == second[key], key
    assert len(first["recommend"]) > 100 and first["metrics"]
