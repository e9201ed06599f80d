"""`bloger recommend`: the top-K items per user from a trained model, streamed to Parquet, CSV or JSONL.

Decoding is `evaluation.rank_histories`, the decoder `evaluate` scores, so `--as-of test
--no-exclude-seen` reproduces evaluate's rankings exactly. With `--exclude-seen` (default) each user
gets K + (their seen items) candidates, from a beam at least that wide, and the seen ones are dropped:
K remain whenever the catalog has K unseen items. A history with no known item gets the most popular
items (by interactions), with an empty score.

Output rows: user_key, rank (1..K), item_key, score (the summed log-probability of the item's codes;
null for popularity rows), and title with --with-titles when the items have one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from bloger_cli.errors import ConfigError
from bloger_cli.progress import Bar
from bloger_cli.recommender.decoding import PrefixIndex
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.ranking import rank_histories
from bloger_cli.runtime import resolve_device
from bloger_cli.serving.bundle import Served, from_file, from_workspace
from bloger_cli.serving.config import RecommendConfig
from bloger_cli.serving.output import RowWriter, check_output
from bloger_cli.serving.requests import Requests, new_histories, workspace_users
from bloger_cli.workspace import Workspace

log = logging.getLogger(__name__)


def run(cfg: RecommendConfig, ws: Workspace | None, *, force: bool = False) -> dict[str, Any]:
    """Recommend cfg.k items for each requested user and write them to cfg.out; returns the summary."""
    started = time.perf_counter()
    if cfg.k < 1:
        raise ConfigError(f"--k {cfg.k}: must be at least 1")
    fmt = check_output(cfg.out, force)
    served = from_file(cfg.model) if cfg.model is not None else from_workspace(ws.latest_run(), cfg.checkpoint)
    if cfg.k > served.num_items:
        raise ConfigError(f"--k {cfg.k} is larger than the catalog ({served.num_items} items)")
    if cfg.histories is not None:
        requests = new_histories(cfg.histories, served.item_keys, served.max_history)
    else:
        requests = workspace_users(ws, cfg.users, cfg.as_of, served.max_history)
    titles = served.titles if cfg.with_titles else None
    if cfg.with_titles and titles is None:
        log.warning("--with-titles: the items have no title column; writing no titles")
    device = resolve_device(cfg.device)
    schema = pa.schema([("user_key", pa.string()), ("rank", pa.int32()), ("item_key", pa.string()),
                        ("score", pa.float32()), *([("title", pa.string())] if titles is not None else [])])
    serve_started = time.perf_counter()
    with RowWriter(cfg.out, fmt, schema) as writer:
        _serve(served, requests, cfg, writer, device, titles)
    serve_seconds = time.perf_counter() - serve_started
    log.info("wrote %d recommendations for %d users to %s", writer.rows, len(requests), cfg.out)
    return {
        "users": len(requests), "rows": writer.rows, "k": cfg.k, "out": str(cfg.out), "format": fmt,
        "source": served.source, "mode": served.mode, "items": served.num_items, "decode": cfg.decode,
        "beam": cfg.beam, "exclude_seen": cfg.exclude_seen, "as_of": cfg.as_of, "device": str(device),
        "users_per_s": round(len(requests) / max(serve_seconds, 1e-9), 1),
        "seconds": round(time.perf_counter() - started, 3), **requests.notes,
    }


@torch.no_grad()
def _serve(served: Served, requests: Requests, cfg: RecommendConfig, writer: RowWriter, device: torch.device,
           titles: pa.Array | None) -> None:
    model = served.model.to(device).eval()
    n = served.num_items
    vocab = model.config.vocab
    codes = served.codes.to(device)
    index = PrefixIndex.build(served.codes, torch.arange(n), vocab.codebook_size).to(device)
    popular = torch.sort(served.popularity, descending=True, stable=True).indices  # (N,) the fallback order
    beam = cfg.beam
    if cfg.decode == "beam" and beam > n:
        log.warning("beam %d is larger than the catalog (%d items): decoding with beam %d", beam, n, n)
        beam = n
    with Bar(-(-len(requests) // cfg.batch_size), "recommending") as bar:
        for start in range(0, len(requests), cfg.batch_size):
            stop = min(start + cfg.batch_size, len(requests))
            seen = requests.seen.slice(start, stop - start)
            items, scores = _decode(model, requests.history[start:stop], seen, codes, index, popular, cfg, beam)
            if cfg.exclude_seen:
                items, scores = drop_seen(items, scores, seen, n)
            writer.write(_rows(requests.user_keys.slice(start, stop - start), items[:, :cfg.k],
                               scores[:, :cfg.k], served.item_keys, titles))
            bar.advance()


def _decode(model: Recommender, history: Tensor, seen: pa.ListArray, codes: Tensor, index: PrefixIndex,
            popular: Tensor, cfg: RecommendConfig, beam: int) -> tuple[Tensor, Tensor]:
    """Candidates (B, W) and scores for a batch of histories (B, H), best first, -1 / NaN past the end.

    With --exclude-seen a user needs K + (their seen items) candidates for K to remain; users are
    decoded in groups of the same power-of-two width, so one long history does not widen everyone's
    beam. Histories with no known item get the popularity order, with NaN scores.
    """
    n = index.num_items
    needed = np.full(len(history), cfg.k)
    if cfg.exclude_seen:
        needed += np.diff(seen.offsets.to_numpy())
    width = np.minimum(2 ** np.ceil(np.log2(np.maximum(needed, 1))).astype(np.int64), n)  # (B,)
    known = (history >= 0).any(dim=1).numpy()  # (B,) False: no known item, the popularity fallback
    items = torch.full((len(history), int(width.max())), -1, dtype=torch.long)  # (B, W)
    scores = torch.full(items.shape, float("nan"))  # (B, W) NaN: not scored by the model
    rows = np.flatnonzero(~known)
    items[rows, :] = popular[:items.shape[1]].expand(len(rows), -1)
    for w in np.unique(width[known]):
        rows = torch.from_numpy(np.flatnonzero(known & (width == w)))
        ranking = rank_histories(model, history[rows].to(codes.device), codes, model.config.vocab, index,
                                 k=int(w), beam=max(beam, int(w)), method=cfg.decode)
        items[rows, :w], scores[rows, :w] = ranking.items.cpu(), ranking.scores.cpu().float()
    return items, scores


def drop_seen(items: Tensor, scores: Tensor, seen: pa.ListArray, num_items: int) -> tuple[Tensor, Tensor]:
    """Items (B, W) and scores, best first, with each row's seen items (and -1 slots) moved out: the
    unseen ones first in their order, then -1 / NaN."""
    offsets = seen.offsets.to_numpy().astype(np.int64)
    counts = np.diff(offsets)
    values = seen.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    seen_keys = torch.from_numpy(rows * num_items + values)  # (E,) row * N + item
    keys = torch.arange(len(items))[:, None] * num_items + items.clamp_min(0)  # (B, W)
    drop = torch.isin(keys, seen_keys) | (items < 0)  # (B, W)
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices  # kept first, in rank order
    dropped = drop.gather(1, order)
    return (items.gather(1, order).masked_fill(dropped, -1),
            scores.gather(1, order).masked_fill(dropped, float("nan")))


def _rows(user_keys: pa.Array, items: Tensor, scores: Tensor, item_keys: pa.Array,
          titles: pa.Array | None) -> pa.Table:
    """(B, K) items and scores -> one row per (user, valid item), rank from 1."""
    valid = (items >= 0).numpy()  # (B, K): valid slots come first in each row
    user, slot = np.nonzero(valid)
    ids = pa.array(items.numpy()[valid])
    score = scores.numpy()[valid].astype(np.float32)
    columns = {
        "user_key": user_keys.take(pa.array(user)), "rank": pa.array(slot + 1, pa.int32()),
        "item_key": item_keys.take(ids), "score": pa.array(score, pa.float32(), mask=np.isnan(score)),
    }
    if titles is not None:
        columns["title"] = titles.take(ids)
    return pa.table(columns)
