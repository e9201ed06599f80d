"""`[baseline]` and `[baseline.sasrec]`: the baseline stage's config (registered in config.STAGE_CONFIGS)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from bloger_cli.config_base import Device, StrictModel, TimeBudget, device_field, seed_field
from bloger_cli.cutoffs import DEFAULT_KS, parse_ks, positive_ks


class SASRecConfig(StrictModel):
    """`[baseline.sasrec]`: the SASRec model and optimiser. Model defaults: RecBole 1.2.1's SASRec (2 blocks,
    2 heads, hidden 64, inner 256, GELU, lr 1e-3) with the SASRec paper's dropout 0.2 (RecBole: 0.5)."""

    layers: int = Field(2, ge=1, description="transformer blocks")
    heads: int = Field(2, ge=1, description="attention heads")
    hidden: int = Field(64, ge=1, description="embedding and hidden width")
    inner: int = Field(256, ge=1, description="feed-forward inner width")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="embedding, residual and (default) attention dropout")
    attention_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None: dropout")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (RecBole: 0)")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> SASRecConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class BaselineConfig(StrictModel):
    """`bloger baseline`: a discriminative baseline on the workspace's own leave-one-out split."""

    model: Literal["sasrec", "popularity"] = Field("sasrec", description="sasrec or popularity")
    epochs: int = Field(200, ge=1, description="maximum SASRec epochs")
    time_budget: TimeBudget = Field(None, description="stop SASRec's training after this much wall time, e.g. "
                                    "90s, 20m, 1h30m (seconds when a number); validation then ends the epoch "
                                    "in progress")
    batch_size: int = Field(256, ge=1, description="training samples per step")
    patience: int | None = Field(10, ge=1, description="stop after this many epochs without a better "
                                 "validation NDCG@10 (None: run every epoch)")
    k: list[int] = Field(list(DEFAULT_KS), min_length=1, description="cut-offs of the test metrics")
    eval_batch_size: int = Field(1024, ge=1, description="users per scoring batch")
    seed: int = seed_field()
    device: Device = device_field()
    sasrec: SASRecConfig = Field(default_factory=SASRecConfig)

    _parse_ks = field_validator("k", mode="before")(classmethod(lambda cls, value: parse_ks(value)))
    _positive_ks = field_validator("k")(classmethod(lambda cls, value: positive_ks(value)))
