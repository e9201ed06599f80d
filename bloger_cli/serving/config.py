"""Configs of the serving commands, `[recommend]` and `[export-model]` (registered in bloger_cli.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from bloger_cli.config_base import Device, StrictModel, device_field


class RecommendConfig(StrictModel):
    """`bloger recommend`: top-K items for workspace users or for new histories, streamed to a file."""

    out: Path = Field(..., description="output file: .parquet, .csv or .jsonl")
    checkpoint: Path | None = Field(None, description="default: the workspace's best.pt")
    model: Path | None = Field(None, description="a `bloger export-model` file: serve without the workspace")
    users: Path | None = Field(None, description="a file of user keys, one a line (default: every user)")
    histories: Path | None = Field(None, description="Parquet or JSONL of user_key, items: [item_key, ...]")
    as_of: Literal["test", "valid"] | None = Field(
        None, description="history cut of the evaluation (None: the whole sequence, the serving case)")
    exclude_seen: bool = Field(True, description="leave out items the user already has")
    k: int = Field(10, description="items per user")
    beam: int = Field(20, ge=1, description="beam width (at least k, more when seen items are excluded)")
    decode: Literal["beam", "exact"] = Field("beam", description="exact: score every item (small catalogs)")
    batch_size: int = Field(256, ge=1, description="users per decoding batch")
    device: Device = device_field()
    with_titles: bool = Field(False, description="add the item title (when the items have one)")

    @model_validator(mode="after")
    def _one_source(self) -> RecommendConfig:
        if self.users is not None and self.histories is not None:
            raise ValueError("give users (--users) or histories (--histories), not both")
        if self.model is not None and self.checkpoint is not None:
            raise ValueError("give model (--model FILE) or checkpoint (--checkpoint), not both")
        if self.model is not None and self.histories is None:
            raise ValueError("model (--model FILE) holds no user histories: give histories (--histories)")
        if self.as_of is not None and self.histories is not None:
            raise ValueError("as_of (--as-of) cuts workspace users' sequences; histories (--histories) "
                             "are used as given")
        return self


class ExportModelConfig(StrictModel):
    """`bloger export-model`: the trained model, its semantic IDs and vocabulary for serving."""

    out: Path = Field(..., description="torch: a file; hf: a folder")
    format: Literal["torch", "hf"] = Field("torch", description="torch: one file for `bloger recommend "
                                           "--model`; hf: a transformers folder")
    checkpoint: Path | None = Field(None, description="default: the workspace's best.pt")
