"""Stage configs: one pydantic model per stage, resolved as file -> named options -> `--set` overrides.

A TOML config file holds one section per stage (``[prepare]``, ``[embed]``, ...). A stage reads its own
section; ``--set key=value`` (or ``--set prepare.key=value``) overrides one key, dotted for nested
sections. The resolved config's hash goes into the catalog and every artifact's metadata.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from bloger_cli.baseline.config import BaselineConfig
from bloger_cli.config_base import MAX_BAD_STEPS, Device, MaxBadSteps, StrictModel, device_field, seed_field
from bloger_cli.cutoffs import DEFAULT_KS, parse_ks, positive_ks
from bloger_cli.errors import ConfigError
from bloger_cli.report.config import ReportConfig
from bloger_cli.serving.config import ExportModelConfig, RecommendConfig
from bloger_cli.training.config import BilevelConfig, ModelConfig, TrainBilevelConfig, TrainConfig, TrainMode  # noqa: F401  (re-exported)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STAGES = ("prepare", "embed", "tokenize", "train-bilevel", "evaluate", "export-ids", "recommend", "export-model",
          "baseline", "report")


SourceKind = Literal["letter", "amazon", "amazon2023", "movielens", "recbole", "table", "synthetic"]


SYNTHETIC_MIN_LENGTH = 5  # every synthetic user gets at least this many interactions (the default 5-core)


class SyntheticConfig(StrictModel):
    """A deterministic synthetic catalog: users drift between related categories."""

    users: int = Field(1000, ge=1, description="number of users")
    items: int = Field(500, ge=2, description="number of items")
    categories: int = Field(20, ge=2, description="item categories (arranged on a ring of related ones)")
    interactions: int = Field(20_000, ge=1, description="total interactions (spread over users)")
    drift: float = Field(0.15, ge=0.0, le=1.0, description="chance per step to move to a neighbouring category")
    follow: float = Field(0.5, ge=0.0, le=1.0, description="chance, when staying in a category, to take the "
                                                             "item after the previous one in the category's order")
    skew: float = Field(1.0, ge=0.0, le=3.0, description="Zipf exponent of item popularity within a category")
    seed: int = Field(0, ge=0, description="same seed, same data")

    @model_validator(mode="after")
    def _enough_items(self) -> SyntheticConfig:
        if self.items < self.categories:
            raise ValueError(
                f"synthetic.items ({self.items}) must be at least synthetic.categories ({self.categories})"
            )
        if self.interactions < SYNTHETIC_MIN_LENGTH * self.users:
            raise ValueError(
                f"synthetic.interactions ({self.interactions}) must be at least {SYNTHETIC_MIN_LENGTH} x "
                f"synthetic.users ({self.users}): every synthetic user has {SYNTHETIC_MIN_LENGTH} or more"
            )
        return self


class PrepareConfig(StrictModel):
    """`bloger prepare`: raw interactions (+ item text) -> interactions, users, items, sequences."""

    unhashed = frozenset({"input", "items"})

    source: SourceKind = Field("letter", description="the format of the raw data")
    input: Path | None = Field(None, description="interactions file or directory holding the source files")
    items: Path | None = Field(None, description="item metadata file (default: found next to the input)")
    user_col: str | None = Field(None, description="table source: user column")
    item_col: str | None = Field(None, description="table source: item column")
    time_col: str | None = Field(None, description="table source: timestamp column (row order if absent)")
    rating_col: str | None = Field(None, description="table source: rating column")
    item_key_col: str | None = Field(None, description="table source: item key column of the items file")
    min_rating: float | None = Field(None, description="keep interactions with rating >= this")
    duplicates: Literal["first", "all"] = Field("first", description="repeated (user, item): keep first or all")
    min_user_interactions: int = Field(5, ge=1, description="k-core threshold for users")
    min_item_interactions: int = Field(5, ge=1, description="k-core threshold for items")
    max_history: int = Field(20, ge=1, description="items of history per training sample")
    sample_users: int | None = Field(None, ge=1, description="keep a seeded random sample of this many users "
                                     "after the k-core (whole histories; for quicker experiments)")
    sample_seed: int = Field(0, description="seed of sample_users")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _source_needs(self) -> PrepareConfig:
        if self.source == "synthetic":
            if self.input is not None:
                raise ValueError("input must not be set when source is 'synthetic'")
            return self
        if self.input is None:
            raise ValueError(f"input is required when source is {self.source!r} (give --input PATH)")
        if self.source == "table" and (self.user_col is None or self.item_col is None):
            raise ValueError("source 'table' needs both user_col and item_col (--user-col, --item-col)")
        if self.source != "table":
            mapped = [n for n in ("user_col", "item_col", "time_col", "rating_col", "item_key_col")
                      if getattr(self, n) is not None]
            if mapped:
                raise ValueError(f"{', '.join(mapped)} only apply to source 'table', not {self.source!r}")
        return self


class EmbedConfig(StrictModel):
    """`bloger embed`: item text -> sentence-transformers embeddings (or a precomputed matrix)."""

    unhashed = frozenset({"from_file"})

    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model name or local directory")
    template: str | None = Field(None, description="text template over item fields, e.g. '{title}. Brand: {brand}'")
    fields: list[str] | None = Field(None, description="fields to join when no template is given")
    on_missing_text: Literal["error", "skip", "empty"] = Field(
        "error", description="items with no text at all: refuse, leave out, or embed the empty string")
    normalize: bool = Field(True, description="L2-normalise the embeddings")
    batch_size: int = Field(128, ge=1, description="texts per encoder batch")
    device: Device = device_field()
    from_file: Path | None = Field(None, description="import a precomputed matrix (.npy or .parquet)")

    @model_validator(mode="after")
    def _template_or_fields(self) -> EmbedConfig:
        if self.template is not None and self.fields is not None:
            raise ValueError("give either template or fields, not both")
        if self.from_file is not None and (self.template is not None or self.fields is not None):
            given = "template" if self.template is not None else "fields"
            raise ValueError(f"from_file imports precomputed vectors: {given} does not apply (drop one of them)")
        return self


class TokenizeConfig(StrictModel):
    """`bloger tokenize`: embeddings -> semantic IDs (RQ-VAE of docs/design.md §1.1, or residual k-means)."""

    unhashed = frozenset({"warm_start", "max_bad_steps"})

    method: Literal["rqvae", "rq-kmeans"] = Field("rqvae", description="the tokenizer")
    levels: int = Field(4, ge=1, le=16, description="residual quantisation levels L")
    codebook_size: int = Field(256, ge=2, le=32767, description="codes per level K")
    code_dim: int = Field(32, ge=1, description="latent dimension d of the codes")
    hidden: list[int] | None = Field(None, description="encoder MLP widths (default: halving from the input)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(200, ge=0, description="RQ-VAE training epochs")
    batch_size: int = Field(1024, ge=1, description="embeddings per RQ-VAE step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    commitment: float = Field(0.25, ge=0, description="mu: weight of the commitment loss")
    kmeans_iters: int = Field(50, ge=1, description="k-means iterations for codebook initialisation")
    dead_codes: Literal["reseed", "none"] = Field("reseed", description="re-seed codes unused in an epoch")
    patience: int | None = Field(20, ge=1, description="stop after this many epochs without improvement")
    max_bad_steps: MaxBadSteps = MAX_BAD_STEPS
    disambiguate: bool = Field(True, description="append a code that makes colliding IDs unique")
    warm_start: Path | None = Field(None, description="an earlier workspace or tokenizer file: start from its "
                                    "weights (no k-means init), then train `epochs` more (0: assign codes only)")
    seed: int = seed_field()
    device: Device = device_field()

    @model_validator(mode="after")
    def _positive_widths(self) -> TokenizeConfig:
        if self.hidden is not None and any(width < 1 for width in self.hidden):
            raise ValueError(f"hidden widths must be >= 1 (got {self.hidden}); leave hidden unset for the default")
        return self


class ExportConfig(StrictModel):
    """`bloger export-ids`: item key, item id and semantic ID to a file."""

    unhashed = frozenset({"compare"})

    out: Path = Field(..., description="output file")
    format: Literal["parquet", "csv", "jsonl"] | None = Field(None, description="default: from the suffix")
    from_: Literal["tokenize", "train"] = Field("tokenize", alias="from", description="the IDs of `bloger "
                                                "tokenize`, or those the trained model decodes with")
    codebooks: Path | None = Field(None, description="also write the codebooks (level, code, vector) here")
    compare: Path | None = Field(None, description="an earlier export: report how many items changed ID")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)




class EvaluateConfig(StrictModel):
    """`bloger evaluate`: decode held-out users and compute Recall@K and NDCG@K, item-level."""

    checkpoint: Path | None = Field(None, description="default: the workspace's best.pt")
    split: Literal["test", "valid"] = Field("test", description="the held-out users to decode")
    k: list[int] = Field(list(DEFAULT_KS), min_length=1, description="cut-offs, e.g. 1,5,10,20")
    beam: int = Field(20, ge=1, description="beam width of constrained decoding")
    decode: Literal["beam", "exact"] = Field("beam", description="exact: score every item (small catalogs)")
    batch_size: int = Field(256, ge=1, description="users per decoding batch")
    device: Device = device_field()

    _parse_ks = field_validator("k", mode="before")(classmethod(lambda cls, value: parse_ks(value)))
    _positive_ks = field_validator("k")(classmethod(lambda cls, value: positive_ks(value)))

    @model_validator(mode="after")
    def _beam_covers_k(self) -> EvaluateConfig:
        if self.decode == "beam" and self.beam < max(self.k):
            raise ValueError(f"beam ({self.beam}) must be at least the largest k ({max(self.k)}): a beam of "
                             f"width W yields W items")
        return self


STAGE_CONFIGS: dict[str, type[StrictModel]] = {
    "prepare": PrepareConfig, "embed": EmbedConfig, "tokenize": TokenizeConfig,
    "train-bilevel": TrainBilevelConfig, "evaluate": EvaluateConfig, "export-ids": ExportConfig,
    "recommend": RecommendConfig, "export-model": ExportModelConfig, "baseline": BaselineConfig,
    "report": ReportConfig,
}


def stage_config(stage: str) -> type[StrictModel]:
    """A stage's config class."""
    return STAGE_CONFIGS[stage]


def config_hash(config: StrictModel) -> str:
    """A short stable hash of a resolved config (what the catalog and artifact metadata record)."""
    exclude = config.hash_exclude() if isinstance(config, StrictModel) else None
    dump = config.model_dump(mode="json", exclude=exclude)
    blob = json.dumps(dump, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file; every stage section must be a known stage."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    unknown = sorted(set(data) - set(STAGES))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown section(s) {', '.join(map(repr, unknown))}",
            hint=f"sections are the stage names: {', '.join(STAGES)}",
        )
    return data


def parse_override(stage: str, text: str) -> tuple[list[str], Any]:
    """`--set a.b=3` -> (['a', 'b'], 3). Values are TOML literals; anything else is a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set min_user_interactions=3")
    parts = key.split(".")
    if parts[0] == stage:
        parts = parts[1:]
    if not parts or not all(parts):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def _assign(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part!r} is a value, not a section")
        tree = child
    tree[parts[-1]] = value


def resolve_config(
    stage: str,
    config_file: Path | None = None,
    options: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> StrictModel:
    """Resolve a stage config: file section, then named CLI options (None = not given), then --set.

    Raises pydantic's ValidationError for invalid values (the CLI prints one bullet per field).
    """
    tree: dict[str, Any] = {}
    if config_file is not None:
        section = load_config_file(config_file).get(stage, {})
        if not isinstance(section, dict):
            raise ConfigError(f"config file {config_file}: [{stage}] must be a table")
        tree = dict(section)
    for name, value in (options or {}).items():
        if value is not None:
            _assign(tree, name.split("."), value)
    for text in sets or []:
        parts, value = parse_override(stage, text)
        _assign(tree, parts, value)
    return stage_config(stage).model_validate(tree)
