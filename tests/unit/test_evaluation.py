"""`bloger evaluate` on a tiny trained workspace: metrics, the popularity row, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bloger_cli.config import EvaluateConfig
from bloger_cli.errors import ArtifactError
from bloger_cli.stages.evaluate import run
from bloger_cli.workspace import Workspace


def test_evaluate_writes_metrics_for_model_and_popularity(trained_workspace: Path) -> None:
    out = run(EvaluateConfig(device="cpu"), Workspace(trained_workspace))
    r = out.result
    assert list(r["metrics"]) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10",
                                  "recall@20", "ndcg@20"]
    assert r["users"] == 100 and r["items"] == 64 and r["split"] == "test"
    for values in (r["metrics"], r["popularity"]):
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert values["recall@1"] <= values["recall@5"] <= values["recall@10"] <= values["recall@20"]
        assert values["recall@1"] == values["ndcg@1"]
    rows = pq.read_table(trained_workspace / "metrics.parquet").to_pylist()
    assert len(rows) == 16 and {row["method"] for row in rows} == {"model", "popularity"}
    assert all(row["run_id"] == out.run_id and row["n_users"] == 100 for row in rows)
    model_rows = {f"{row['metric']}@{row['k']}": row["value"] for row in rows if row["method"] == "model"}
    assert model_rows == r["metrics"]


def test_beam_as_wide_as_the_catalog_equals_exact_scoring(trained_workspace: Path) -> None:
    ws = Workspace(trained_workspace)
    beam = run(EvaluateConfig(device="cpu", beam=64, split="valid"), ws).result["metrics"]
    exact = run(EvaluateConfig(device="cpu", decode="exact", split="valid"), ws).result["metrics"]
    assert beam == pytest.approx(exact, abs=1e-9)


def test_beam_wider_than_the_catalog_is_clamped(trained_workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = run(EvaluateConfig(device="cpu", beam=500), Workspace(trained_workspace))
    assert "beam 500 is larger than the catalog (64 items): decoding with beam 64" in caplog.text
    assert out.result["metrics"]["recall@20"] >= out.result["metrics"]["recall@10"]


def test_evaluate_before_training(tokenized_workspace: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no checkpoint at .*best\.pt") as info:
        run(EvaluateConfig(device="cpu"), Workspace(tokenized_workspace))
    assert info.value.hint == "run `bloger train-bilevel` first"


def test_checkpoint_from_another_workspace_is_refused(trained_workspace: Path, tiny_workspace: Path) -> None:
    with pytest.raises(ArtifactError, match=r"checkpoint .*best\.pt was trained on other sequences"):
        run(EvaluateConfig(device="cpu", checkpoint=trained_workspace / "best.pt"), Workspace(tiny_workspace))


def test_damaged_checkpoint_is_refused(trained_workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match=r"is not a readable checkpoint"):
        run(EvaluateConfig(device="cpu", checkpoint=bad), Workspace(trained_workspace))


@pytest.mark.parametrize("k, message", [
    ("0,5", "k: every k must be at least 1 (got 0)"),
    ("5,ten", "k: k must be comma-separated whole numbers like 1,5,10,20 (got '5,ten')"),
    ("", "k: k must be comma-separated whole numbers like 1,5,10,20 (got '')"),
])
def test_bad_k_is_a_usage_error(cli, trained_workspace: Path, k: str, message: str) -> None:
    result = cli("evaluate", "-w", trained_workspace, "--k", k)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_beam_narrower_than_k(cli, trained_workspace: Path) -> None:
    result = cli("evaluate", "-w", trained_workspace, "--beam", "5")
    assert result.exit_code == 2
    assert "beam (5) must be at least the largest k (20)" in result.stderr


def test_cli_json_has_metrics(cli, trained_workspace: Path) -> None:
    result = cli("evaluate", "-w", trained_workspace, "--k", "5,10", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["metrics"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    assert out["result"]["popularity"].keys() == out["metrics"].keys()


def test_cli_table(cli, trained_workspace: Path) -> None:
    result = cli("evaluate", "-w", trained_workspace, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "test metrics (100 users, 64 items, item-level, beam decoding)" in result.stderr
    assert "popularity recall" in result.stderr and "ndcg" in result.stderr


def test_evaluate_in_a_copied_workspace(trained_workspace: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained_workspace, copy)
    assert run(EvaluateConfig(device="cpu"), Workspace(copy)).result["users"] == 100


def test_decode_ranks_come_back_in_the_samples_order(trained_workspace: Path) -> None:
    # users are decoded grouped by history length; the ranks must still line up with the samples
    import torch

    from bloger_cli.data.samples import load_split
    from bloger_cli.recommender.decoding import PrefixIndex
    from bloger_cli.recommender.ranking import decode_ranks
    from bloger_cli.training.checkpoint import build_recommender, load_checkpoint

    ws = Workspace(trained_workspace)
    ckpt = load_checkpoint(ws.path("checkpoint"))
    model, codes = build_recommender(ckpt, ws.path("checkpoint")), ckpt["codes"].long()
    samples = load_split(ws.path("sequences"), "test")
    index = PrefixIndex.build(codes, torch.arange(len(codes)), model.config.codebook_size)

    def ranks(s):
        return decode_ranks(model, s, codes, model.config.vocab, index, k=10, beam=10, method="beam", batch_size=7,
                            device=torch.device("cpu"))
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ranks(samples)[perm], ranks(samples.select(perm)))
    one_by_one = torch.cat([ranks(samples.select(torch.tensor([i]))) for i in range(len(samples))])
    assert torch.equal(ranks(samples), one_by_one)  # a user's rank does not depend on its batch
