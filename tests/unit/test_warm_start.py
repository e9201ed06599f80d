"""--warm-start: tokenize and train-bilevel start from an earlier run's weights; items get codes from
the tokenizer by their content; a different layout is one clear error."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bloger_cli.config import TokenizeConfig
from bloger_cli.errors import ConfigError
from bloger_cli.stages import tokenize, train
from bloger_cli.tokenizer.io import load_tokenizer
from bloger_cli.training.checkpoint import load_checkpoint
from bloger_cli.workspace import Workspace


def rqvae_config(**overrides) -> TokenizeConfig:  # the settings of the rqvae_workspace fixture
    values = {"method": "rqvae", "levels": 2, "codebook_size": 16, "epochs": 0, "hidden": [16], "code_dim": 8,
              "device": "cpu", **overrides}
    return TokenizeConfig(**values)


def codes(root: Path) -> np.ndarray:
    return np.array(pq.read_table(root / "semantic_ids.parquet").column("codes").to_pylist())


def test_tokenize_warm_start_keeps_the_tokenizer_and_codes_new_content_by_it(rqvae_workspace: Path,
                                                                            tmp_path: Path, make_embeddings) -> None:
    later = tmp_path / "later"
    shutil.copytree(rqvae_workspace, later)
    result = tokenize.run(rqvae_config(warm_start=rqvae_workspace), Workspace(later), force=True).result
    assert result["epochs_run"] == 0
    assert np.array_equal(codes(later), codes(rqvae_workspace))  # same weights, same items: same IDs
    assert tokenize.run(rqvae_config(warm_start=rqvae_workspace), Workspace(later)).skipped

    vectors = np.random.default_rng(7).normal(size=(64, 16))  # the items' text changed (or they are new)
    make_embeddings(later, vectors)
    tokenize.run(rqvae_config(warm_start=rqvae_workspace), Workspace(later), force=True)
    earlier = load_tokenizer(Workspace(rqvae_workspace))
    expected = earlier.codes(torch.tensor(vectors, dtype=torch.float32)).numpy()
    assert np.array_equal(codes(later)[:, :2], expected)  # the earlier tokenizer's codes of the new content


def test_tokenize_warm_start_trains_on_from_the_weights(rqvae_workspace: Path, tmp_path: Path) -> None:
    later = tmp_path / "later"
    shutil.copytree(rqvae_workspace, later)
    result = tokenize.run(rqvae_config(warm_start=rqvae_workspace / "tokenizer.pt", epochs=3, patience=None),
                          Workspace(later), force=True).result
    assert result["epochs_run"] == 3


@pytest.mark.parametrize("overrides, message", [
    ({"levels": 3}, "levels 2 (config: 3)"),
    ({"codebook_size": 8}, "codebook_size 16 (config: 8)"),
    ({"method": "rq-kmeans"}, "method rqvae (config: rq-kmeans)"),
])
def test_tokenize_warm_start_with_another_layout_is_refused(rqvae_workspace: Path, tmp_path: Path, overrides,
                                                           message) -> None:
    later = tmp_path / "later"
    shutil.copytree(rqvae_workspace, later)
    before = codes(later)
    with pytest.raises(ConfigError, match=re.escape(message)):
        tokenize.run(rqvae_config(warm_start=rqvae_workspace, **overrides), Workspace(later), force=True)
    assert np.array_equal(codes(later), before)  # nothing written


def test_warm_start_from_nothing_is_a_clear_error(rqvae_workspace: Path, tmp_path: Path, cli) -> None:
    result = cli("tokenize", "-w", rqvae_workspace, "--warm-start", tmp_path / "missing")
    assert result.exit_code == 2 and "--warm-start" in result.stderr and "no such workspace or file" in result.stderr
    (tmp_path / "empty").mkdir()
    result = cli("train-bilevel", "-w", rqvae_workspace, "--warm-start", tmp_path / "empty")
    assert result.exit_code == 2 and "has no trained recommender" in result.stderr


def test_train_warm_start_begins_at_the_earlier_weights(trained_workspace: Path, tokenized_workspace: Path,
                                                        train_config) -> None:
    cfg = train_config(epochs=1, warm_start=trained_workspace, train={"lr": 1e-12, "clip_norm": None})
    train.run(cfg, Workspace(tokenized_workspace))
    earlier = load_checkpoint(trained_workspace / "best.pt")["model"]
    now = load_checkpoint(tokenized_workspace / "best.pt")["model"]
    for name, value in earlier.items():
        torch.testing.assert_close(now[name], value, rtol=0, atol=1e-6, msg=name)


def test_train_warm_start_with_another_model_size_is_refused(trained_workspace: Path, tokenized_workspace: Path,
                                                             train_config) -> None:
    cfg = train_config(epochs=1, warm_start=trained_workspace / "best.pt")
    cfg.model.d_model = 32
    with pytest.raises(ConfigError, match=r"d_model 16 \(now 32\)"):
        train.run(cfg, Workspace(tokenized_workspace))
