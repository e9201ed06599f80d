"""`bloger tokenize` end to end on 64 synthetic items (D = 8, K = 8, L = 3): artifacts, result, determinism,
rq-kmeans, the loader, and the exact message of every bad input.

Embeddings are registered honestly through the stage runner (`make_embeddings` in conftest: an `embed`
run over the prepared items whose body writes given vectors instead of encoding text).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloger_cli.artifacts import SPECS, load_torch
from bloger_cli.config import TokenizeConfig
from bloger_cli.errors import ArtifactError, DataError
from bloger_cli.stages.tokenize import run
from bloger_cli.tokenizer.io import load_tokenizer, read_embeddings
from bloger_cli.tokenizer.kmeans import RQKMeans
from bloger_cli.tokenizer.rqvae import RQVAE
from bloger_cli.workspace import Workspace

N, D, L, K = 64, 8, 3, 8
RESULT_KEYS = {"method", "items", "levels", "codebook_size", "id_length", "collision_rate", "colliding_items",
               "largest_collision_group", "reconstruction_error", "epochs_run", "device", "seconds",
               "level_stats"}


def vectors(seed: int = 0, n: int = N, dim: int = D) -> np.ndarray:
    """Eight loose clusters, so codes carry structure."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(8, dim))[np.arange(n) % 8] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def cfg(**overrides) -> TokenizeConfig:
    return TokenizeConfig(**{"levels": L, "codebook_size": K, "code_dim": 4, "epochs": 3, "batch_size": 16,
                             "kmeans_iters": 10, "device": "cpu", **overrides})


@pytest.fixture
def ws(items64_workspace: Path, make_embeddings) -> Path:
    make_embeddings(items64_workspace, vectors())
    return items64_workspace


def semantic_ids(root: Path) -> pa.Table:
    return pq.read_table(root / "semantic_ids.parquet")


def test_rqvae_stage_writes_every_artifact_and_the_result(ws):
    out = run(cfg(), Workspace(ws))
    r = out.result
    assert set(r) == RESULT_KEYS
    assert (r["method"], r["items"], r["levels"], r["codebook_size"], r["id_length"]) == ("rqvae", N, L, K, L + 1)
    assert r["epochs_run"] == 3 and r["device"] == "cpu"
    assert r["colliding_items"] == round(r["collision_rate"] * N)
    json.dumps(r)  # the catalog stores it as JSON
    table = semantic_ids(ws)
    assert table.schema.field("codes").type == pa.list_(pa.int16(), L + 1)
    assert table.column("item_id").to_pylist() == list(range(N))
    codes = np.array(table.column("codes").to_pylist())
    assert len({tuple(c) for c in codes}) == N  # one-to-one
    assert codes[:, :L].max() < K and codes[:, L].max() < r["largest_collision_group"]
    stats = pq.read_table(ws / "codebook_stats.parquet").to_pylist()
    assert stats == r["level_stats"] and [s["level"] for s in stats] == [1, 2, 3]
    assert stats[-1]["collision_rate"] == r["collision_rate"]
    ckpt = load_torch(ws / "tokenizer.pt", SPECS["tokenizer"])
    assert ckpt["rows"] == N and ckpt["method"] == "rqvae"
    assert ckpt["config"] == {"input_dim": D, "code_dim": 4, "levels": L, "codebook_size": K, "hidden": [],
                              "dropout": 0.0, "commitment": 0.25}


def test_loaded_tokenizer_reproduces_the_semantic_ids(ws):
    run(cfg(), Workspace(ws))
    model = load_tokenizer(Workspace(ws))
    assert isinstance(model, RQVAE) and not model.training
    _, x = read_embeddings(ws / "embeddings.parquet")
    codes = np.array(semantic_ids(ws).column("codes").to_pylist())
    assert np.array_equal(model.codes(x).numpy(), codes[:, :L])


def test_same_seed_same_input_gives_identical_semantic_ids(items64_workspace, make_embeddings, tmp_path):
    other = tmp_path / "again"
    shutil.copytree(items64_workspace, other)
    for root in (items64_workspace, other):
        make_embeddings(root, vectors())
        run(cfg(), Workspace(root))
    assert semantic_ids(items64_workspace).equals(semantic_ids(other))
    assert (pq.read_table(items64_workspace / "codebook_stats.parquet")
            .equals(pq.read_table(other / "codebook_stats.parquet")))


def test_rq_kmeans_stores_only_codebooks(ws):
    r = run(cfg(method="rq-kmeans"), Workspace(ws)).result
    assert r["method"] == "rq-kmeans" and r["epochs_run"] == 0 and r["id_length"] == L + 1
    ckpt = load_torch(ws / "tokenizer.pt", SPECS["tokenizer"])
    assert sorted(ckpt["state_dict"]) == [f"quantizer.codebooks.{i}" for i in range(L)]
    assert ckpt["state_dict"]["quantizer.codebooks.0"].shape == (K, D)
    model = load_tokenizer(ws / "tokenizer.pt", input_dim=D)
    assert isinstance(model, RQKMeans)
    # the quantised sum is the reconstruction: its MSE is the last level's residual error over D
    assert r["reconstruction_error"] == pytest.approx(r["level_stats"][-1]["quantization_error"] / D, rel=1e-5)


def test_without_disambiguation_ids_have_l_codes(ws):
    r = run(cfg(disambiguate=False), Workspace(ws)).result
    assert r["id_length"] == L
    assert semantic_ids(ws).schema.field("codes").type == pa.list_(pa.int16(), L)


def test_unchanged_inputs_skip_and_new_embeddings_redo(ws, make_embeddings):
    first = run(cfg(), Workspace(ws))
    assert run(cfg(), Workspace(ws)).skipped
    make_embeddings(ws, vectors(seed=1))
    again = run(cfg(), Workspace(ws))
    assert not again.skipped and again.run_id != first.run_id


def test_nan_embedding_names_the_first_bad_item(items64_workspace, make_embeddings):
    bad = vectors()
    bad[5, 2] = np.nan
    bad[9, 0] = np.inf
    make_embeddings(items64_workspace, bad)
    with pytest.raises(DataError) as err:
        run(cfg(), Workspace(items64_workspace))
    assert str(err.value) == (f"{items64_workspace / 'embeddings.parquet'}: the embedding of item 5 is not finite "
                              "(NaN or inf); 2 item(s) affected; re-run `bloger embed --force` (and check the "
                              "input it embeds)")
    assert not (items64_workspace / "semantic_ids.parquet").exists()


def test_fewer_items_than_codes(ws):
    with pytest.raises(DataError) as err:
        run(cfg(codebook_size=128), Workspace(ws))
    assert str(err.value) == "k-means cannot initialise 128 codes from 64 items; lower --codebook-size to at most 64"
    with pytest.raises(DataError, match="cannot initialise 128 codes from 64 items"):
        run(cfg(codebook_size=128, method="rq-kmeans"), Workspace(ws))


def test_no_embeddings_says_run_embed(items64_workspace):
    with pytest.raises(ArtifactError) as err:
        run(cfg(), Workspace(items64_workspace))
    assert str(err.value) == (f"no embeddings artifact at {items64_workspace / 'embeddings.parquet'}; "
                              "run `bloger embed` first")


def test_loader_refuses_embeddings_of_another_dimension(ws, make_embeddings):
    run(cfg(), Workspace(ws))
    make_embeddings(ws, vectors(dim=6))
    with pytest.raises(ArtifactError) as err:
        load_tokenizer(Workspace(ws))
    assert str(err.value) == (f"tokenizer {ws / 'tokenizer.pt'} was trained on 8-d embeddings, but the "
                              "embeddings are 6-d; re-run `bloger tokenize` or use embeddings of the matching "
                              "dimension")


def test_cli_tokenize_json(ws, cli):
    res = cli("tokenize", "-w", ws, "--codebook-size", K, "--levels", L, "--epochs", 2, "--device", "cpu",
              "--set", "code_dim=4", "--set", "batch_size=16", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["stage"] == "tokenize" and out["result"]["epochs_run"] == 2
    assert len(out["result"]["level_stats"]) == L
    shown = cli("tokenize", "-w", ws, "--codebook-size", K, "--levels", L, "--epochs", 2, "--device", "cpu",
                "--set", "code_dim=4", "--set", "batch_size=16")
    assert shown.exit_code == 0 and "codebook statistics" in shown.stderr and "up to date" in shown.stderr


def test_hidden_widths_must_be_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"hidden widths must be >= 1 \(got \[64, 0\]\)"):
        TokenizeConfig(hidden=[64, 0])


def test_embeddings_of_another_item_set_are_refused(ws):
    """prepare re-run on other data after embed: the embeddings no longer belong to the items."""
    from bloger_cli.config import PrepareConfig, SyntheticConfig
    from bloger_cli.stages import prepare

    other = SyntheticConfig(users=100, items=64, categories=8, interactions=1000, seed=1)
    prepare.run(PrepareConfig(source="synthetic", synthetic=other, min_user_interactions=1,
                              min_item_interactions=1), Workspace(ws))
    with pytest.raises(ArtifactError) as err:
        run(cfg(), Workspace(ws))
    message = str(err.value)
    assert message.startswith(f"{ws / 'embeddings.parquet'} was made from another items artifact (recorded ")
    assert message.endswith("; re-run `bloger embed`")
    assert not (ws / "semantic_ids.parquet").exists()
