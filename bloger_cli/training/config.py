"""`[train-bilevel]`: the recommender's model (`[train-bilevel.model]`), its optimiser, schedule, budget and
validation (`[train-bilevel.train]`) and the tokenizer's updates in modes joint and bilevel
(`[train-bilevel.bilevel]`). Re-exported by bloger_cli.config, which registers the stage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from bloger_cli.config_base import MAX_BAD_STEPS, Device, MaxBadSteps, StrictModel, TimeBudget, device_field, seed_field


class ModelConfig(StrictModel):
    """`[train-bilevel.model]`: the T5-style encoder-decoder (defaults: the paper's 4 + 4 layers, d 128)."""

    d_model: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1, description="encoder layers")
    num_decoder_layers: int | None = Field(None, ge=1, description="decoder layers (default: num_layers)")
    num_heads: int = Field(6, ge=1)
    d_kv: int = Field(64, ge=1, description="width of each attention head")
    d_ff: int = Field(1024, ge=1, description="feed-forward inner width")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="dropout of the attention weights (None: dropout, as T5). On CPU "
        "it keeps SDPA off its fused kernel: 0 makes a training step about 1.6x faster there")
    rel_buckets: int = Field(32, ge=2, description="relative position buckets")
    rel_max_distance: int = Field(128, ge=2, description="relative distance beyond which buckets saturate")


class TrainConfig(StrictModel):
    """`[train-bilevel.train]`: optimiser, schedule, validation and early stopping."""

    unhashed = frozenset({"max_bad_steps", "tracker"})

    lr: float = Field(5e-4, gt=0, description="recommender AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="after the warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr")
    clip_norm: float | None = Field(1.0, gt=0, description="gradient clipping (None: off)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on capable GPUs")
    compile: bool = Field(False, description="torch.compile the training forward pass (the meta step runs eager)")
    eval_every: int = Field(1, ge=1, description="validate every this many epochs")
    val_users: int | None = Field(None, ge=1, description="validate on a fixed sample of this many users (None: all)")
    val_beam: int = Field(20, ge=10, description="beam width of validation decoding (metrics are @10)")
    metric: Literal["recall@10", "ndcg@10"] = Field("ndcg@10", description="early stopping and best.pt")
    patience: int | None = Field(10, ge=1, description="stop after this many validations without improvement")
    eval_batch_size: int = Field(256, ge=1, description="users per decoding batch")
    eval_every_steps: int | None = Field(None, ge=1, description="validate every this many steps instead of "
                                         "every `eval_every` epochs (long epochs, time budgets)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (the schedule "
                                  "spans them)")
    time_budget: TimeBudget = Field(None, description="stop after this much wall time, e.g. 90s, 20m, 1h30m "
                                    "(seconds when a number); the schedule spans it")
    decay_start: float = Field(0.0, ge=0.0, lt=1.0, description="share of the run at the full rate before the "
                               "decay begins (after the warmup)")
    max_bad_steps: MaxBadSteps = MAX_BAD_STEPS
    tracker: Literal["none", "tensorboard"] = Field(
        "none", description="mirror every history row as it is written: tensorboard writes event files to "
        "WORKSPACE/tensorboard/[RUN/]RUN_ID (needs bloger[tensorboard])")
    bucket_group: int | None = Field(50, ge=1, description="length-grouped batches: shuffle, sort megabatches "
                                     "of this many batches by history length, shuffle the batches (None: off)")


class BilevelConfig(StrictModel):
    """`[train-bilevel.bilevel]`: the tokenizer's updates in modes joint and bilevel (docs/design.md §1.3, §4.1)."""

    lam: float = Field(0.5, ge=0, description="tokenizer gradient = lam * g_tok + g_rec (paper: 0.5)")
    surgery: Literal["pcgrad", "none", "official"] = Field(
        "pcgrad", description="pcgrad: project g_rec off g_tok when they conflict; official: the paper "
        "code's row-normalised variant")
    updates_per_epoch: int = Field(1, ge=1, description="bilevel: meta steps per epoch (paper: 1 to 4)")
    tokenizer_every: int | None = Field(None, ge=1, description="bilevel: a meta step every N steps "
                                        "(overrides updates_per_epoch)")
    lookahead_lr: float | None = Field(None, gt=0, description="eta of theta' = theta - eta * grad "
                                       "(None: train.lr)")
    meta_batch: Literal["same", "next"] = Field("same", description="batch of the look-ahead loss")
    meta_chunk: int | None = Field(32, ge=1, description="samples in the meta step's second-order graph at "
                                   "a time (same gradient, less memory; None: the whole batch)")
    tokenizer_lr: float = Field(1e-4, gt=0)
    tokenizer_weight_decay: float = Field(1e-4, ge=0)
    tokenizer_warmup: int = Field(0, ge=0, description="bilevel: tokenizer updates over which its rate rises "
                                  "linearly to tokenizer_lr")
    placement: Literal["start", "end"] = Field(
        "start", description="bilevel: where an epoch's meta steps fall: start (the first after the epoch's "
        "first step, the rest spread after it) or end (the last on the epoch's last step, as the paper's code)")
    settle_steps: int | None = Field(None, ge=0, description="bilevel: no tokenizer update fewer than this many "
                                     "steps before a validation, so the recommender learns new codes first "
                                     "(None: an eighth of an epoch)")
    freeze_last: float = Field(0.0, description="bilevel: share of the run at its end with the tokenizer frozen "
                               "(0 <= share < 1)")
    meta_batches: int = Field(1, ge=1, description="bilevel: batches whose meta-gradients are averaged in one "
                              "update (the current one and fresh random ones)")
    max_churn: float | None = Field(None, gt=0.0, le=1.0, description="bilevel: scale an update back (halving, "
                                    "up to 6 times, then skip it) while it would re-code more than this share "
                                    "of items")
    @field_validator("freeze_last")
    @classmethod
    def _freeze_within_run(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"freeze_last is the share of the run at its end with the tokenizer frozen, "
                             f"0 <= share < 1 (got {value}): a freeze of the whole run is --mode fixed")
        return value

    routing: Literal["full", "official"] = Field(
        "full", description="soft assignments of levels >= 2: full (gradient through the residual into the "
        "encoder and earlier codebooks) or official (residual detached: a level moves only its codebook)")
    tok_loss: Literal["sum", "mean"] = Field(
        "sum", description="L_tok in modes joint and bilevel: squared errors summed over coordinates (as "
        "`tokenize`) or averaged (the official code's weight against L_rec)")


TrainMode = Literal["fixed", "joint", "bilevel"]


class TrainBilevelConfig(StrictModel):
    """`bloger train-bilevel`: the generative recommender (and, in bilevel modes, the tokenizer)."""

    unhashed = frozenset({"warm_start"})

    mode: TrainMode = Field("bilevel", description="fixed: tokenizer frozen (TIGER); joint: both on L_rec + "
                            "lam * L_tok; bilevel: the meta step (BLOGER)")
    epochs: int = Field(200, ge=1, description="maximum epochs")
    batch_size: int = Field(256, ge=1, description="training samples per step")
    seed: int = seed_field()
    device: Device = device_field()
    warm_start: Path | None = Field(None, description="an earlier workspace or checkpoint: start the recommender "
                                    "from its weights (same model size and ID layout)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    bilevel: BilevelConfig = Field(default_factory=BilevelConfig)
