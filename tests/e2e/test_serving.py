"""`bloger recommend` and `bloger export-model` on the tiny trained workspace (64 items, 100 users, a
1-layer model): the evaluate cut reproduces evaluate's rankings, seen items are excluded, new histories
and the exported file serve without the workspace, the HF export decodes to the same top-10, and every
bad input is one line with an exit code and no output file."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bloger_cli.data.samples import load_split
from bloger_cli.recommender.batch import make_batch
from bloger_cli.recommender.decoding import PrefixIndex, recommend
from bloger_cli.training.checkpoint import build_recommender, load_checkpoint


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["result"]


def lists(path: Path) -> dict[str, list[str]]:
    """user_key -> item keys by rank, from a recommend output (any format)."""
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        rows = pq.read_table(path).to_pylist()
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["user_key"], []).append(row["item_key"])
        assert int(row["rank"]) == len(out[row["user_key"]])
    return out


def keys(ws: Path, kind: str) -> list[str]:
    """Raw keys by dense id (users or items)."""
    table = pq.read_table(ws / f"{kind}.parquet").sort_by(f"{kind[:-1]}_id")
    return table.column(f"{kind[:-1]}_key").to_pylist()


def sequences(ws: Path) -> dict[str, list[str]]:
    users, items = keys(ws, "users"), keys(ws, "items")
    table = pq.read_table(ws / "sequences.parquet").to_pylist()
    return {users[r["user_id"]]: [items[i] for i in r["items"]] for r in table}


def test_as_of_test_gives_exactly_evaluates_rankings(cli, trained_workspace: Path, tmp_path: Path) -> None:
    ws, out = trained_workspace, tmp_path / "recs.parquet"
    result = ok(cli("recommend", "-w", ws, "--out", out, "--as-of", "test", "--no-exclude-seen", "--json"))
    assert (result["users"], result["rows"], result["k"], result["items"]) == (100, 1000, 10, 64)
    assert result["users_per_s"] > 0
    got = lists(out)

    # the pieces evaluate decodes with, called directly: the test histories, beam 20
    ckpt = load_checkpoint(ws / "best.pt")
    model, codes = build_recommender(ckpt, ws / "best.pt"), ckpt["codes"].long()
    samples = load_split(ws / "sequences.parquet", "test")
    batch = make_batch(samples, codes, model.config.vocab)
    index = PrefixIndex.build(codes, torch.arange(len(codes)), model.config.vocab.codebook_size)
    ranking = recommend(model, batch.input_ids, batch.attention_mask, index, k=20, beam=20)
    users, items = keys(ws, "users"), keys(ws, "items")
    expected = {users[u]: [items[i] for i in row[:10]] for u, row in zip(samples.user_ids.tolist(),
                                                                            ranking.items.tolist())}
    assert got == expected

    # and evaluate's metrics are the ones these lists give
    metrics = json.loads(cli("evaluate", "-w", ws, "--k", "10", "--json").stdout)["metrics"]
    targets = {users[u]: items[t] for u, t in zip(samples.user_ids.tolist(), samples.target.tolist())}
    hits = [got[u].index(t) if t in got[u] else None for u, t in targets.items()]
    assert metrics["recall@10"] == pytest.approx(sum(h is not None for h in hits) / len(hits))
    assert metrics["ndcg@10"] == pytest.approx(sum(1 / math.log2(h + 2) for h in hits if h is not None) / len(hits))


def test_serving_excludes_seen_items_and_keeps_k(cli, trained_workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "recs.csv"
    result = ok(cli("recommend", "-w", trained_workspace, "--out", out, "--k", "10", "--json"))
    got, seen = lists(out), sequences(trained_workspace)
    assert result["users"] == len(got) == 100 and result["exclude_seen"] is True
    for user, recs in got.items():
        assert len(recs) == 10 and len(set(recs)) == 10 and not set(recs) & set(seen[user]), user
    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["user_key", "rank", "item_key", "score"]
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_users_file_in_its_order_with_unknown_keys_skipped(cli, trained_workspace: Path, tmp_path: Path) -> None:
    users = keys(trained_workspace, "users")
    wanted = tmp_path / "users.txt"
    wanted.write_text(f"{users[5]}\nnobody\n\n{users[2]}\n{users[5]}\nghost\n")
    out = tmp_path / "recs.jsonl"
    result = ok(cli("recommend", "-w", trained_workspace, "--users", wanted, "--out", out, "--k", "3", "--json"))
    assert list(lists(out)) == [users[5], users[2]]
    assert (result["users"], result["unknown_users"], result["unknown_user_keys"]) == (2, 2, ["nobody", "ghost"])
    assert "2 of 4 user keys are not users of" in result_stderr(cli, trained_workspace, wanted, tmp_path)


def result_stderr(cli, ws: Path, wanted: Path, tmp_path: Path) -> str:
    return cli("recommend", "-w", ws, "--users", wanted, "--out", tmp_path / "again.csv").stderr


def test_new_histories_with_unknown_items_and_the_popularity_fallback(cli, trained_workspace: Path,
                                                                       tmp_path: Path) -> None:
    items = keys(trained_workspace, "items")
    histories = tmp_path / "h.jsonl"
    histories.write_text("\n".join(json.dumps(row) for row in [
        {"user_key": "new-1", "items": [items[3], "no-such-item", items[7]]},
        {"user_key": "new-2", "items": ["unknown"]},
        {"user_key": "new-3", "items": []},
    ]) + "\n")
    out = tmp_path / "recs.parquet"
    result = ok(cli("recommend", "-w", trained_workspace, "--histories", histories, "--out", out, "--k", "5",
                    "--json"))
    assert (result["users"], result["unknown_items"], result["popularity_users"]) == (3, 2, 2)
    rows = pq.read_table(out).to_pylist()
    got = lists(out)
    assert not {items[3], items[7]} & set(got["new-1"])
    counts = pq.read_table(trained_workspace / "items.parquet").sort_by([("n_interactions", "descending"),
                                                                        ("item_id", "ascending")])
    popular = counts.column("item_key").to_pylist()[:5]
    assert got["new-2"] == got["new-3"] == popular
    assert all(r["score"] is None for r in rows if r["user_key"] != "new-1")  # not scored by the model
    assert all(r["score"] is not None and r["score"] < 0 for r in rows if r["user_key"] == "new-1")


def test_exported_file_serves_without_the_workspace(cli, trained_workspace: Path, tmp_path: Path) -> None:
    users, seq = keys(trained_workspace, "users"), sequences(trained_workspace)
    histories = tmp_path / "h.parquet"
    pq.write_table(pa.table({"user_key": users[:20], "items": [seq[u] for u in users[:20]]}), histories)
    model = tmp_path / "model.pt"
    exported = ok(cli("export-model", "-w", trained_workspace, "--out", model, "--json"))
    assert (exported["format"], exported["items"], exported["bytes"]) == ("torch", 64, model.stat().st_size)
    data = torch.load(model, weights_only=True)
    assert "sequences" not in data and len(data["item_keys"]) == 64

    from_ws, from_file = tmp_path / "ws.csv", tmp_path / "file.csv"
    ok(cli("recommend", "-w", trained_workspace, "--histories", histories, "--out", from_ws, "--json"))
    ok(cli("recommend", "-w", tmp_path / "no-workspace", "--model", model, "--histories", histories,
           "--out", from_file, "--json"))
    assert from_ws.read_text() == from_file.read_text()
    # the histories are the users' whole sequences: the serving case, the same as their workspace rows
    served = tmp_path / "users.csv"
    (tmp_path / "u.txt").write_text("\n".join(users[:20]))
    ok(cli("recommend", "-w", trained_workspace, "--users", tmp_path / "u.txt", "--out", served, "--json"))
    assert served.read_text() == from_ws.read_text()
    assert not (tmp_path / "no-workspace").exists()


def test_hf_export_decodes_to_the_same_top_10(cli, trained_workspace: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "model-hf"
    result = ok(cli("export-model", "-w", trained_workspace, "--format", "hf", "--out", folder, "--json"))
    assert result["format"] == "hf"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "semantic_ids.parquet",
                                                 "token_layout.json", "README.md"}
    layout = json.loads((folder / "token_layout.json").read_text())
    assert (layout["pad"], layout["eos"], layout["codebook_size"], layout["offsets"][1]) == (0, 1, 16, 18)

    # bloger recommend with a beam as wide as the catalog: the exact ranking, which the README's
    # recommend_exact computes with transformers alone
    users, seq = keys(trained_workspace, "users"), sequences(trained_workspace)
    out = tmp_path / "recs.parquet"
    ok(cli("recommend", "-w", trained_workspace, "--out", out, "--no-exclude-seen", "--beam", "64", "--json"))
    got = lists(out)
    readme = (folder / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0].replace("print(", "(")
    assert f'folder = "{folder.name}"' in code
    namespace: dict = {}
    code = code.replace(f'folder = "{folder.name}"', f'folder = "{folder}"')
    exec(compile(code, "README.md", "exec"), namespace)
    for user in users[:10]:
        assert [key for key, _ in namespace["recommend_exact"](seq[user][-20:], k=10)] == got[user], user
        beam = namespace["recommend_beam"](seq[user][-20:], k=10, beam=20)
        assert len(beam) == 10 and {key for key, _ in beam} <= set(keys(trained_workspace, "items"))


# ------------------------------------------------------------------------------------------ bad input


def fails(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.splitlines()[0] == f"error: {message}", result.stderr


@pytest.mark.parametrize("k, message", [("0", "--k 0: must be at least 1"),
                                        ("65", "--k 65 is larger than the catalog (64 items)")])
def test_bad_k(cli, trained_workspace: Path, tmp_path: Path, k: str, message: str) -> None:
    fails(cli("recommend", "-w", trained_workspace, "--out", tmp_path / "r.csv", "--k", k), 2, message)
    assert not (tmp_path / "r.csv").exists()


def test_all_users_unknown(cli, trained_workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("nobody\nghost\n")
    fails(cli("recommend", "-w", trained_workspace, "--users", tmp_path / "u.txt", "--out", tmp_path / "r.csv"), 1,
          f"--users {tmp_path / 'u.txt'}: none of its 2 user key(s) is a user of {trained_workspace} (nobody, ghost)")
    assert not (tmp_path / "r.csv").exists()


def test_histories_without_the_items_column(cli, trained_workspace: Path, tmp_path: Path) -> None:
    path = tmp_path / "h.parquet"
    pq.write_table(pa.table({"user_key": ["a"], "history": [["x"]]}), path)
    fails(cli("recommend", "-w", trained_workspace, "--histories", path, "--out", tmp_path / "r.csv"), 1,
          f"--histories {path}: missing column 'items' (columns are user_key, history)")
    assert not (tmp_path / "r.csv").exists()


def test_checkpoint_with_another_id_layout(cli, trained_workspace: Path, tmp_path: Path) -> None:
    from bloger_cli.artifacts import save_torch

    ckpt = load_checkpoint(trained_workspace / "best.pt")
    ckpt["codes"] = torch.cat([ckpt["codes"], ckpt["codes"][:, :1]], dim=1)  # one level more
    other = tmp_path / "other.pt"
    save_torch({k: v for k, v in ckpt.items() if k != "metadata"}, other, ckpt["metadata"])
    fails(cli("recommend", "-w", trained_workspace, "--checkpoint", other, "--out", tmp_path / "r.csv"), 2,
          f"checkpoint {other} decodes 64 items with IDs of 4 codes from 16, "
          f"{trained_workspace / 'trained_semantic_ids.parquet'} has 64 items with IDs of 3 codes from 16")


def test_output_in_a_missing_directory(cli, trained_workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "nope" / "r.parquet"
    fails(cli("recommend", "-w", trained_workspace, "--out", out), 2,
          f"--out {out}: directory {out.parent} does not exist")
    fails(cli("export-model", "-w", trained_workspace, "--out", out), 2,
          f"--out {out}: directory {out.parent} does not exist")
    assert not out.parent.exists()


def test_existing_output_needs_force(cli, trained_workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_text("keep me\n")
    fails(cli("recommend", "-w", trained_workspace, "--out", out), 2, f"--out {out} exists")
    assert out.read_text() == "keep me\n"
    ok(cli("recommend", "-w", trained_workspace, "--out", out, "--force", "--k", "2", "--json"))
    assert len(lists(out)) == 100
    model = tmp_path / "m.pt"
    model.write_text("old")
    fails(cli("export-model", "-w", trained_workspace, "--out", model), 2, f"--out {model} exists")
    assert model.read_text() == "old"


def test_model_file_needs_histories(cli, tmp_path: Path) -> None:
    result = cli("recommend", "--model", tmp_path / "m.pt", "--out", tmp_path / "r.csv")
    assert result.exit_code == 2
    assert "model (--model FILE) holds no user histories: give histories (--histories)" in result.stderr


def test_bilevel_run_serves_and_exports_its_trained_ids(cli, rqvae_workspace: Path, train_config,
                                                        tmp_path: Path) -> None:
    from bloger_cli.stages import train
    from bloger_cli.tokenizer.io import read_codes
    from bloger_cli.workspace import Workspace

    train.run(train_config(mode="bilevel", epochs=1), Workspace(rqvae_workspace))
    trained, _ = read_codes(rqvae_workspace / "trained_semantic_ids.parquet")
    model = tmp_path / "model.pt"
    ok(cli("export-model", "-w", rqvae_workspace, "--out", model, "--json"))
    assert torch.equal(torch.load(model, weights_only=True)["codes"].long(), trained)
    out = tmp_path / "recs.csv"
    result = ok(cli("recommend", "-w", rqvae_workspace, "--out", out, "--k", "5", "--json"))
    assert (result["mode"], result["users"], result["rows"]) == ("bilevel", 100, 500)
