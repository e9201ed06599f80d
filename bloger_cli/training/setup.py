"""What a training run starts from: the samples and semantic IDs, the trainable tokenizer and the item
embeddings (modes joint and bilevel), an earlier run's weights (`--warm-start`), and the state built
from them (`build_run`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from bloger_cli.artifacts import SPECS, ArtifactInfo
from bloger_cli.config import TrainBilevelConfig
from bloger_cli.data.samples import load_split, training_items
from bloger_cli.errors import ConfigError, DataError
from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import Vocab
from bloger_cli.runtime import seed_everything
from bloger_cli.tokenizer.io import embedding_dim, load_tokenizer, read_codes, read_embeddings
from bloger_cli.tokenizer.rqvae import RQVAE
from bloger_cli.training.checkpoint import load_checkpoint
from bloger_cli.training.distributed import Distributed
from bloger_cli.training.state import TrainData, TrainState, new_state

log = logging.getLogger(__name__)


def load_data(cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo]) -> tuple[TrainData, int]:
    """Training samples, the validation sample and the semantic IDs; returns (data, tokenizer levels L)."""
    codes, meta = read_codes(infos["semantic_ids"].path)  # (N, L')
    sequences = infos["sequences"].path
    train, valid = load_split(sequences, "train"), load_split(sequences, "valid")
    for name, samples in (("training", train), ("validation", valid)):
        largest = int(max(samples.history.max(), samples.target.max()))
        if largest >= len(codes):
            raise DataError(f"{sequences}: {name} item id {largest} has no semantic ID ({len(codes)} items in "
                            f"{infos['semantic_ids'].path})", hint="re-run `bloger embed` and `bloger tokenize`")
    if cfg.train.val_users is not None and cfg.train.val_users < len(valid):
        pick = torch.randperm(len(valid), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train.val_users]
        valid = valid.select(pick.sort().values)  # a fixed sample: the same users every epoch
    vocab = Vocab(codes.shape[1], int(meta["codebook_size"]))
    weights = torch.bincount(training_items(sequences), minlength=len(codes)).double()
    return TrainData(train, valid, codes, torch.arange(len(codes)), vocab, item_weights=weights), int(meta["levels"])


def load_tokenizer_side(cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo],
                        n_items: int) -> tuple[RQVAE, Tensor]:
    """Modes joint and bilevel: the trainable tokenizer and every item's embedding (N, D) by item id."""
    path = infos["embeddings"].path
    tokenizer = load_tokenizer(infos["tokenizer"].path, input_dim=embedding_dim(path))
    if not isinstance(tokenizer, RQVAE):
        raise ConfigError(f"--mode {cfg.mode} trains the tokenizer, but {infos['tokenizer'].path} is residual "
                          "k-means, which has no trainable encoder",
                          hint="re-run `bloger tokenize --method rqvae`, or train with --mode fixed")
    item_ids, x = read_embeddings(path)
    if len(item_ids) != n_items or int(item_ids.max()) != n_items - 1:
        raise DataError(f"{path}: embeddings cover {len(item_ids)} items, the semantic IDs {n_items}",
                        hint="re-run `bloger embed` and `bloger tokenize`")
    embeddings = torch.empty_like(x)
    embeddings[item_ids] = x
    return tokenizer, embeddings


def warm_checkpoint_path(source: Path) -> Path:
    """The checkpoint a --warm-start names: a file, or a workspace's best.pt."""
    if source.is_file():
        return source
    if source.is_dir():
        path = source / SPECS["checkpoint"].filename
        if path.is_file():
            return path
        raise ConfigError(f"--warm-start {source}: the workspace has no trained recommender (no {path.name})",
                          hint="run `bloger train-bilevel` there first, or pass a checkpoint file")
    raise ConfigError(f"--warm-start {source}: no such workspace or file")


def warm_start(model: Recommender, source: Path) -> None:
    """Load an earlier run's recommender weights into `model`; the model size and the ID layout (levels,
    codes per level) must be the same, else a clear error naming what differs."""
    path = warm_checkpoint_path(source)
    ckpt = load_checkpoint(path)
    have, want = ckpt["model_config"], model.config.to_dict()
    free = ("dropout", "attention_dropout")  # training settings; everything else fixes shapes or layout
    diff = [f"{key} {have.get(key)} (now {want[key]})" for key in want
            if key not in free and have.get(key) != want[key]]
    if diff:
        raise ConfigError(f"--warm-start {path} does not fit this run: {', '.join(diff)}",
                          hint="keep the earlier run's model settings and tokenize levels / codebook size, "
                          "or start without --warm-start")
    model.load_state_dict(ckpt["model"])
    log.info("recommender weights from %s (epoch %d)", path, int(ckpt["epoch"]))


def build_run(cfg: TrainBilevelConfig, infos: dict[str, ArtifactInfo], dist: Distributed,
              device: torch.device) -> tuple[TrainState, TrainData, RecommenderConfig]:
    """A fresh run on `device`: the data (codes and embeddings still on the CPU), the recommender (seeded,
    or warm-started), the tokenizer in modes joint and bilevel, and the optimisers over the plan."""
    data, soft_levels = load_data(cfg, infos)
    tokenizer = None
    if cfg.mode != "fixed":
        tokenizer, data.embeddings = load_tokenizer_side(cfg, infos, len(data.codes))
        tokenizer = tokenizer.to(device)
    seed_everything(cfg.seed)  # before the weights are initialised
    model_config = RecommenderConfig(levels=data.vocab.levels, codebook_size=data.vocab.codebook_size,
                                     soft_levels=soft_levels, **cfg.model.model_dump())
    model = Recommender(model_config)
    if cfg.warm_start is not None:
        warm_start(model, cfg.warm_start)
    model = model.to(device)
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    state = new_state(model, cfg, steps_per_epoch, tokenizer)
    state.dist, state.net = dist, dist.wrap(model)
    if cfg.train.compile:
        state.net = torch.compile(state.forward)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s parameters on %d samples (%d steps per epoch) on %s%s", f"{n_params:,}",
             len(data.train), steps_per_epoch, device, f" and {dist.world - 1} more processes" if dist.enabled else "")
    return state, data, model_config
