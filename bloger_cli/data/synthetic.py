"""The synthetic source: a deterministic catalog with sequential structure a model can learn.

The generative story (all of it vectorised numpy, seeded by `SyntheticConfig.seed`):
- Items are split into `categories` on a ring: category c is related to c-1 and c+1. Inside a
  category the items have an order (a chain) and a Zipf popularity (exponent `skew`) that is
  independent of the order.
- Each user starts in a random category. At each step it moves to a neighbouring category with
  probability `drift` (and picks a popular item there); otherwise, with probability `follow`, it takes
  the item after its previous one in the category's chain, else a popular item of the category.
  So "the next item follows the last one" and "the next item is in the last item's category" both
  beat global popularity.
- A user never sees an item twice: repeated draws are dropped and the walk continues until the user
  has its drawn length (lognormal, mean interactions/users, at least SYNTHETIC_MIN_LENGTH).
- Item text comes from per-category vocabularies of made-up words; neighbouring categories share a
  few words and brands, so text embeddings reflect the ring.

Columns reach DuckDB as Arrow tables, the keys ("u0000001", "i000123") as dictionary columns whose
strings exist once per user and item: nothing runs per interaction in Python. Memory stays near
50 bytes per interaction on the numpy side (about 0.55 GiB peak for 10^7).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bloger_cli.config import SYNTHETIC_MIN_LENGTH, PrepareConfig, SyntheticConfig
from bloger_cli.data.sources import SourceFiles, SourceInfo

log = logging.getLogger(__name__)

TEXT_FIELDS = ["title", "category", "brand", "description"]
MAX_ROUNDS = 8  # walk rounds to replace repeated draws; users still short after that keep fewer items
LENGTH_SIGMA = 1.0  # lognormal spread of the extra length above the minimum
START_TS = 1_577_836_800  # 2020-01-01 UTC: users start within two years of it
START_SPAN = 2 * 365 * 86_400
MEAN_GAP = 2 * 86_400  # mean seconds between a user's consecutive interactions

# Vocabulary: each category owns OWN_WORDS made-up words and borrows SHARED_WORDS from each neighbour.
OWN_WORDS, SHARED_WORDS, TITLE_WORDS = 8, 2, 3
OWN_BRANDS, BRAND_LOYALTY = 4, 0.8  # brands per category; chance an item's brand is its category's own
_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st", "pl", "gr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_SYLLABLES = [o + v for o in _ONSETS for v in _VOWELS]  # 100 syllables, 10^6 three-syllable words
_PRODUCT_NOUNS = ["set", "kit", "pack", "edition", "classic", "mini", "pro", "plus", "series", "collection"]


def synthetic_files(cfg: PrepareConfig) -> SourceFiles:
    """The synthetic source reads no files."""
    return SourceFiles([])


class Interactions(NamedTuple):
    """Generated interactions, user-major and in time order within each user."""

    users: np.ndarray  # (N,) int32, user index from 0 (key "u%07d" % (index + 1))
    items: np.ndarray  # (N,) int32, item index from 0 (key "i%06d" % (index + 1)); categories are shuffled
    ts: np.ndarray  # (N,) int64, epoch seconds, strictly increasing per user
    short_users: int  # users that got fewer interactions than drawn (catalog too small for them)


@dataclass(frozen=True)
class World:
    """The item side: category layout, popularity, and the map to item keys.

    Internal item ids are laid out by category, each category in chain order: category c holds
    start[c]..start[c+1]-1, and the chain position of an item is its offset from start[c].
    """

    start: np.ndarray  # (C+1,) int64
    rank_cum: np.ndarray  # (S,) float64: cumulative Zipf weight of popularity ranks 0..S-1 (S = largest category)
    pos_at: np.ndarray  # (I,) int64: pos_at[start[c] + r] = chain position of category c's rank-r item
    key_of: np.ndarray  # (I,) int32: internal item -> item index (keys are shuffled across categories)

    @property
    def categories(self) -> int:
        return len(self.start) - 1

    def category_of(self) -> np.ndarray:
        """(I,) int64: each internal item's category."""
        return np.repeat(np.arange(self.categories), np.diff(self.start))


def build_world(cfg: SyntheticConfig, rng: np.random.Generator) -> World:
    sizes = np.full(cfg.categories, cfg.items // cfg.categories, dtype=np.int64)
    sizes[: cfg.items % cfg.categories] += 1
    start = np.concatenate([[0], np.cumsum(sizes)])
    cat = np.repeat(np.arange(cfg.categories), sizes)
    # Popularity ranks are a random permutation of each category's chain: popular items are not neighbours.
    shuffled = np.argsort(cat + rng.random(cfg.items), kind="stable")  # grouped by category, shuffled inside
    rank_cum = np.cumsum(1.0 / np.arange(1.0, sizes.max() + 1.0) ** cfg.skew)
    key_of = rng.permutation(cfg.items).astype(np.int32)
    return World(start=start, rank_cum=rank_cum, pos_at=shuffled - start[cat], key_of=key_of)


def sample_popular(world: World, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A popularity draw inside each given category; returns positions in the category's chain."""
    size = world.start[cats + 1] - world.start[cats]
    # One small CDF serves every category: a category of size s uses its first s ranks.
    rank = np.searchsorted(world.rank_cum, rng.random(len(cats)) * world.rank_cum[size - 1], side="right")
    rank = np.minimum(rank, size - 1)  # guards the rounding at the top of the range
    return world.pos_at[world.start[cats] + rank]


def _step(world: World, cfg: SyntheticConfig, rng: np.random.Generator, cat: np.ndarray, pos: np.ndarray) -> None:
    """One transition for every walker; `cat` and `pos` are updated in place."""
    r = rng.random(len(cat))
    move = r < cfg.drift
    follow = ~move & (r < cfg.drift + (1.0 - cfg.drift) * cfg.follow)
    side = rng.integers(0, 2, int(move.sum())) * 2 - 1  # left or right on the ring
    cat[move] = (cat[move] + side) % world.categories
    nxt = pos[follow] + 1
    pos[follow] = np.where(nxt < np.diff(world.start)[cat[follow]], nxt, 0)  # the chain wraps around
    jump = ~follow
    pos[jump] = sample_popular(world, cat[jump], rng)


def walk(world: World, cfg: SyntheticConfig, rng: np.random.Generator, cat: np.ndarray, pos: np.ndarray,
         steps: np.ndarray) -> np.ndarray:
    """Advance user u's walk by steps[u]; returns the internal items visited, user-major.

    One numpy pass per step over the users still walking: users are sorted longest first, so at step
    t the walkers are a prefix. `cat`/`pos` (U,) carry the walk state between calls.
    """
    order = np.argsort(-steps, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(steps)])
    out = np.empty(offsets[-1], dtype=np.int32)
    base, c, p = offsets[:-1][order], cat[order], pos[order]
    walkers = np.searchsorted(-steps[order], -np.arange(int(steps.max(initial=0))), side="left")
    for t, n in enumerate(walkers):
        cv, pv = c[:n], p[:n]  # views: _step writes through to c and p
        _step(world, cfg, rng, cv, pv)
        out[base[:n] + t] = world.start[cv] + pv
    cat[order], pos[order] = c, p
    return out


def draw_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(U,) int64 sequence lengths: SYNTHETIC_MIN_LENGTH plus a lognormal extra, summing to `interactions`."""
    extra_total = cfg.interactions - SYNTHETIC_MIN_LENGTH * cfg.users  # >= 0 (the config checks it)
    raw = rng.lognormal(0.0, LENGTH_SIGMA, cfg.users)
    extra = np.floor(raw * (extra_total / raw.sum())).astype(np.int64)
    rest = extra_total - int(extra.sum())  # < users: one more for `rest` random users
    extra[rng.choice(cfg.users, rest, replace=False)] += 1
    return extra + SYNTHETIC_MIN_LENGTH


def first_visits(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """(N,) bool: False where the row repeats an earlier (user, item) row.

    A value sort finds the few repeated pairs; only their rows need the (slower) stable argsort.
    """
    key = users.astype(np.int64) * n_items + items
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]  # sorted, a key may appear twice: fine below
    keep = np.ones(len(key), dtype=bool)
    if len(repeated) == 0:
        return keep
    slot = np.minimum(np.searchsorted(repeated, key), len(repeated) - 1)
    rows = np.flatnonzero(repeated[slot] == key)  # every row of a repeated pair, in row order
    sub = key[rows]
    order = np.argsort(sub, kind="stable")  # the first visit leads its key
    later = np.ones(len(rows), dtype=bool)
    later[0] = False
    later[1:] = sub[order[1:]] == sub[order[:-1]]
    keep[rows[order[later]]] = False
    return keep


def _truncate(users: np.ndarray, keep: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`keep`, also dropping each user's kept rows beyond lengths[u] (rows grouped by user, in order)."""
    seen = np.cumsum(keep)
    first = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=len(lengths)))[:-1]])  # (U,)
    before = np.where(first > 0, seen[np.maximum(first - 1, 0)], 0)  # (U,) kept rows of earlier users
    return keep & ((seen - before[users]) <= lengths[users])


def _top_up(world: World, cfg: SyntheticConfig, rng: np.random.Generator, state: tuple[np.ndarray, np.ndarray],
            users: np.ndarray, items: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Walk on for the users that lost repeated draws until they reach their length (MAX_ROUNDS at most).

    Each round touches only the rows of users still short; finished users' rows are set aside, and
    at the end every user's rows are put back together, user-major.
    """
    user_ids = np.arange(cfg.users, dtype=np.int32)
    need = lengths - np.bincount(users, minlength=cfg.users)
    done_users, done_items = [], []
    for round_ in range(1, MAX_ROUNDS + 1):
        short = (need > 0)[users]
        done_users.append(users[~short])
        done_items.append(items[~short])
        users, items = users[short], items[short]
        if round_ == MAX_ROUNDS or not need.any():
            break
        steps = 2 * need  # twice the shortfall: some of these draws repeat too
        users = np.concatenate([users, np.repeat(user_ids, steps)])
        items = np.concatenate([items, walk(world, cfg, rng, *state, steps)])
        order = np.argsort(users, kind="stable")  # user-major, earlier rounds first
        users, items = users[order], items[order]
        keep = _truncate(users, first_visits(users, items, cfg.items), lengths)
        users, items = users[keep], items[keep]
        need = np.where(need > 0, lengths - np.bincount(users, minlength=cfg.users), 0)
        log.debug("synthetic walk round %d: %d users short", round_, int((need > 0).sum()))
    users = np.concatenate([*done_users, users])
    items = np.concatenate([*done_items, items])
    order = np.argsort(users, kind="stable")
    return users[order], items[order], int((need > 0).sum())


def generate(cfg: SyntheticConfig) -> tuple[World, Interactions]:
    """The item world and all interactions of the synthetic source (same config, same arrays)."""
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    world = build_world(cfg, rng)
    lengths = draw_lengths(cfg, rng)
    cat = rng.integers(0, world.categories, cfg.users)
    state = (cat, sample_popular(world, cat, rng))  # where each walk starts; updated by every walk
    users = np.repeat(np.arange(cfg.users, dtype=np.int32), lengths)
    items = walk(world, cfg, rng, *state, lengths)
    keep = first_visits(users, items, cfg.items)
    users, items, short = users[keep], items[keep], 0
    if len(users) < cfg.interactions:
        users, items, short = _top_up(world, cfg, rng, state, users, items, lengths)
    ts = _timestamps(users, cfg.users, rng)
    return world, Interactions(users, world.key_of[items], ts, short)


def _timestamps(users: np.ndarray, n_users: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) int64: a random start per user, then exponential gaps of at least one second."""
    start = START_TS + rng.integers(0, START_SPAN, n_users)
    gaps = rng.exponential(MEAN_GAP, len(users)).astype(np.int64) + 1
    total = np.concatenate([[0], np.cumsum(gaps)])  # (N+1,) gaps up to each row
    first = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=n_users))[:-1]])  # (U,) first row
    return start[users] + total[1:] - total[first][users]


def _vocabulary(n_cat: int) -> tuple[np.ndarray, np.ndarray]:
    """Word ids: (C, V) each category's vocabulary (its own words, then SHARED_WORDS of each neighbour)
    and (C, OWN_BRANDS) its brands. Own words are 0..C*OWN_WORDS-1, brands follow."""
    own = np.arange(n_cat * OWN_WORDS).reshape(n_cat, OWN_WORDS)
    ring = np.arange(n_cat)
    vocab = np.concatenate([own, own[(ring - 1) % n_cat, :SHARED_WORDS], own[(ring + 1) % n_cat, :SHARED_WORDS]],
                           axis=1)
    brands = own.size + np.arange(n_cat * OWN_BRANDS).reshape(n_cat, OWN_BRANDS)
    return vocab, brands


def item_text(world: World, cfg: SyntheticConfig, keys: pa.Array) -> pa.Table:
    """`raw_items` rows in item-key order: title, category, brand, description from category vocabularies.

    E.g. title "Trecobra sebrota costudi nalesta plus", category "Branugro Lacagre", brand "Trecobra".
    """
    rng = np.random.Generator(np.random.PCG64([cfg.seed, 1]))  # its own stream: text ignores user counts
    n_cat, n_items = world.categories, len(world.key_of)
    vocab, brands = _vocabulary(n_cat)
    words = _made_up_words(rng, n_cat * OWN_WORDS + brands.size)
    cat = world.category_of()[np.argsort(world.key_of)]  # (I,) category of each item, in key order
    picks = vocab[cat[:, None], rng.integers(0, vocab.shape[1], (n_items, TITLE_WORDS + 2))]  # (I, W)
    w = [pc.take(words, picks[:, k]) for k in range(picks.shape[1])]
    loyal = rng.random(n_items) < BRAND_LOYALTY  # else a neighbouring category's brand
    brand_cat = np.where(loyal, cat, (cat + rng.integers(0, 2, n_items) * 2 - 1) % n_cat)
    brand = pc.utf8_capitalize(pc.take(words, brands[brand_cat, rng.integers(0, OWN_BRANDS, n_items)]))
    noun = pc.take(pa.array(_PRODUCT_NOUNS), rng.integers(0, len(_PRODUCT_NOUNS), n_items))
    names = [pc.utf8_capitalize(pc.take(words, vocab[:, k])) for k in (0, 1)]  # a category is named by 2 words
    category = pc.take(pc.binary_join_element_wise(*names, " "), cat)
    title = pc.binary_join_element_wise(brand, *w[:TITLE_WORDS], noun, " ")
    description = pc.binary_join_element_wise(
        pc.utf8_capitalize(w[TITLE_WORDS]), " ", w[TITLE_WORDS + 1], " ", noun, " by ", brand, ", from the ",
        category, " range, with ", w[0], " and ", w[1], ".", "")
    return pa.table({"item_key": keys, "title": title, "category": category, "brand": brand,
                     "description": description})


def _made_up_words(rng: np.random.Generator, count: int) -> pa.Array:
    """`count` distinct pronounceable words ("velora"): three syllables, more for huge catalogs."""
    n_syl = 3
    while len(_SYLLABLES) ** n_syl < 50 * count:  # a sparse draw: numpy then avoids permuting the whole pool
        n_syl += 1
    codes = rng.choice(len(_SYLLABLES) ** n_syl, count, replace=False)
    syllables = pa.array(_SYLLABLES)
    parts = [pc.take(syllables, (codes // len(_SYLLABLES) ** k) % len(_SYLLABLES)) for k in range(n_syl)]
    return pc.binary_join_element_wise(*parts, "")


def _keys(prefix: str, count: int, width: int) -> pa.Array:
    """["u0000001", "u0000002", ...]: `count` keys, numbered from 1 and zero-padded to `width` digits."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(1, count + 1)), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def load_synthetic(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, files: SourceFiles) -> SourceInfo:
    """Generate the synthetic source into the `raw` and `raw_items` tables."""
    syn = cfg.synthetic
    world, data = generate(syn)
    item_keys = _keys("i", syn.items, max(6, len(str(syn.items))))
    # Dictionary columns: the key strings exist once per user/item; DuckDB expands them (fast, in C++).
    table = pa.table({
        "user_key": pa.DictionaryArray.from_arrays(data.users, _keys("u", syn.users, max(7, len(str(syn.users))))),
        "item_key": pa.DictionaryArray.from_arrays(data.items, item_keys),
        "ts": data.ts,
        "ord": np.arange(len(data.users), dtype=np.int64),
    })
    short = data.short_users
    del data  # the Arrow table holds the columns now (zero-copy); drop the rest before DuckDB copies them
    con.register("synthetic_arrow", table)
    con.execute("CREATE OR REPLACE TABLE raw AS SELECT user_key::VARCHAR AS user_key, item_key::VARCHAR AS "
                "item_key, ts, NULL::DOUBLE AS rating, ord FROM synthetic_arrow")
    con.unregister("synthetic_arrow")
    del table
    con.register("synthetic_items", item_text(world, syn, item_keys))
    con.execute("CREATE OR REPLACE TABLE raw_items AS SELECT * FROM synthetic_items")
    con.unregister("synthetic_items")
    info = SourceInfo(has_time=True, has_rating=False, text_fields=list(TEXT_FIELDS))
    info.notes.append(f"synthetic: {syn.users:,} users, {syn.items:,} items in {syn.categories:,} categories, "
                      f"drift {syn.drift:g}, follow {syn.follow:g}, skew {syn.skew:g}, seed {syn.seed}")
    if short:
        info.notes.append(f"synthetic: {short:,} user{'s' if short > 1 else ''} got fewer interactions than drawn "
                          "(their walks kept revisiting items; add items or lower interactions)")
    return info
