"""The synthetic source: deterministic, sized as configured, text on every item, and learnable."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from bloger_cli.config import PrepareConfig, SyntheticConfig, resolve_config
from bloger_cli.data.synthetic import OWN_WORDS, SHARED_WORDS, TEXT_FIELDS, TITLE_WORDS, generate
from bloger_cli.stages import prepare
from bloger_cli.workspace import Workspace

KINDS = ("interactions", "users", "items", "sequences")
DEFAULT = SyntheticConfig()  # 1,000 users, 500 items, 20 categories, 20,000 interactions


def run(root: Path, syn: SyntheticConfig, **cfg) -> tuple[dict, dict[str, pa.Table]]:
    """`prepare --source synthetic` into root/ws; returns the summary and the artifacts."""
    ws = Workspace(root / "ws")
    out = prepare.run(PrepareConfig(source="synthetic", synthetic=syn, **cfg), ws)
    return out.result, {kind: pq.read_table(root / "ws" / f"{kind}.parquet") for kind in KINDS}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[dict, dict[str, pa.Table]]:
    return run(tmp_path_factory.mktemp("synthetic"), DEFAULT)


def test_same_seed_same_artifacts(tmp_path, default_run):
    _, first = default_run
    _, again = run(tmp_path / "again", DEFAULT)
    for kind in KINDS:
        assert again[kind].equals(first[kind]), kind
    _, other = run(tmp_path / "other", DEFAULT.model_copy(update={"seed": 1}))
    assert not other["sequences"].equals(first["sequences"])


def test_generate_is_deterministic():
    (_, a), (_, b) = generate(DEFAULT), generate(DEFAULT)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_sizes_as_configured(default_run):
    summary, _ = default_run
    assert (summary["users"], summary["items"]) == (DEFAULT.users, DEFAULT.items)
    assert abs(summary["interactions"] - DEFAULT.interactions) <= 0.01 * DEFAULT.interactions
    assert summary["min_sequence_length"] >= 5
    assert summary["max_sequence_length"] >= 3 * summary["avg_sequence_length"]  # lengths vary


def test_keys_time_order_and_no_repeats(default_run):
    _, t = default_run
    assert all(re.fullmatch(r"u\d{7}", k) for k in t["users"].column("user_key").to_pylist())
    assert all(re.fullmatch(r"i\d{6}", k) for k in t["items"].column("item_key").to_pylist())
    for items, ts in zip(t["sequences"].column("items").to_pylist(), t["sequences"].column("ts").to_pylist()):
        assert len(set(items)) == len(items)
        assert all(a < b for a, b in zip(ts, ts[1:]))


def test_every_item_has_text(default_run):
    summary, t = default_run
    assert summary["text_fields"] == TEXT_FIELDS and summary["items_without_text"] == 0
    rows = t["items"].to_pylist()
    assert all(r[f] for r in rows for f in TEXT_FIELDS)
    assert all(r["title"].startswith(r["brand"] + " ") for r in rows)
    assert len({r["category"] for r in rows}) == DEFAULT.categories


def test_titles_use_their_category_vocabulary(default_run):
    _, t = default_run
    words = defaultdict(set)
    for r in t["items"].to_pylist():
        words[r["category"]].update(r["title"].split()[1:1 + TITLE_WORDS])
    assert all(len(w) <= OWN_WORDS + 2 * SHARED_WORDS for w in words.values())
    assert len(set().union(*words.values())) == DEFAULT.categories * OWN_WORDS


def hit_rates(sequences: list[list[int]], category: dict[int, str]) -> dict[str, float]:
    """HR@10 on each user's last item: global popularity, the last item's most frequent successors,
    and the most popular items of the last item's category (all counted on the training part)."""
    popular, successors, in_category = Counter(), defaultdict(Counter), defaultdict(Counter)
    for seq in sequences:
        train = seq[:-1]
        popular.update(train)
        for a, b in zip(train, train[1:]):
            successors[a][b] += 1
        for i in train:
            in_category[category[i]][i] += 1
    top = [i for i, _ in popular.most_common(10)]

    def top10(counts: Counter) -> list[int]:
        ranked = [i for i, _ in counts.most_common(10)]
        return ranked + [i for i in top if i not in ranked][: 10 - len(ranked)]

    hits = Counter()
    for seq in sequences:
        last, target = seq[-2], seq[-1]
        hits["popularity"] += target in top
        hits["successor"] += target in top10(successors[last])
        hits["category"] += target in top10(in_category[category[last]])
    return {k: v / len(sequences) for k, v in hits.items()}


def test_sequential_structure_beats_popularity(default_run):
    _, t = default_run
    category = dict(zip(t["items"].column("item_id").to_pylist(), t["items"].column("category").to_pylist()))
    hr = hit_rates(t["sequences"].column("items").to_pylist(), category)
    print(f"HR@10 {hr}")
    assert hr["successor"] >= 1.5 * hr["popularity"]
    assert hr["category"] >= 1.5 * hr["popularity"]


def test_kcore_matches_a_reference(tmp_path):
    """prepare's k-core equals a plain fixed-point loop over the generated pairs (5 rounds here)."""
    syn = SyntheticConfig(users=300, items=200, categories=10, interactions=4000, seed=3)
    summary, t = run(tmp_path, syn, min_user_interactions=8, min_item_interactions=10)
    _, data = generate(syn)
    users, items = data.users, data.items
    while True:
        keep = (np.bincount(users)[users] >= 8) & (np.bincount(items)[items] >= 10)
        if keep.all():
            break
        users, items = users[keep], items[keep]
    assert 0 < summary["interactions"] == len(users) < syn.interactions
    keys = dict(zip(t["users"].column("user_id").to_pylist(), t["users"].column("user_key").to_pylist()))
    got = sorted((keys[u], len(s)) for u, s in zip(t["sequences"].column("user_id").to_pylist(),
                                                    t["sequences"].column("items").to_pylist()))
    want = sorted((f"u{u + 1:07d}", n) for u, n in Counter(users.tolist()).items())
    assert got == want


def test_small_catalog_gives_short_users(tmp_path):
    syn = SyntheticConfig(users=10, items=6, categories=2, interactions=200)
    _, data = generate(syn)
    assert data.short_users == 10 and len(data.users) == 60  # each user saw every item once
    summary, _ = run(tmp_path, syn, min_user_interactions=1, min_item_interactions=1)
    assert any("10 users got fewer interactions than drawn" in n for n in summary["notes"])


def test_needs_five_interactions_per_user():
    with pytest.raises(ValidationError) as exc:
        SyntheticConfig(users=100, interactions=499)
    assert ("synthetic.interactions (499) must be at least 5 x synthetic.users (100)"
            in exc.value.errors()[0]["msg"])


def test_quickstart_example_runs(tmp_path):
    path = Path(__file__).resolve().parents[3] / "examples" / "quickstart.toml"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# make quickstart  (runs, on workspace bloger-work/quickstart:)"
    cfg = resolve_config("prepare", path)
    out = prepare.run(cfg, Workspace(tmp_path / "ws"))
    assert out.result["users"] == cfg.synthetic.users and out.result["items_without_text"] == 0
