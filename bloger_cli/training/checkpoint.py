"""Training checkpoints: what `best.pt` / `last.pt` hold, atomic saves, and the checks before reuse.

A checkpoint is a plain dict (tensors and plain values only, loaded with `weights_only=True`):
the recommender's config and weights, the optimiser and scheduler states, the epoch and step reached,
the RNG states, the semantic IDs the model was trained on, the training config hash, the content
hashes of the inputs, and the early-stopping state. While a run is in progress they live in
`WORKSPACE/training/`, rewritten atomically after every epoch, so a killed run loses at most one
epoch; a run that finishes moves them to the workspace root as the stage's artifacts.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bloger_cli.artifacts import SPECS, ArtifactInfo, load_torch, save_torch, temp_path_for
from bloger_cli.errors import ArtifactError, ConfigError, DamagedFile
from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.model import Recommender

IN_PROGRESS = "training"  # WORKSPACE/training/{last,best}.pt while a run is going


def in_progress_dir(root: Path) -> Path:
    return root / IN_PROGRESS


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    state = np.random.get_state()  # legacy=True (the default): the tuple form
    assert isinstance(state, tuple)
    name, keys, pos, has_gauss, gauss = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(ckpt: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    save_torch(ckpt, tmp, metadata)  # removes its partial file when the write fails
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A recommender checkpoint (best.pt or last.pt), checked to hold what evaluation and resume need."""
    ckpt = _load_any(path)
    needed = ("model_config", "model", "codes", "config_hash", "inputs", "epoch", "step")
    missing = [key for key in needed if key not in ckpt]
    if missing:
        raise DamagedFile(f"{path} is not a bloger recommender checkpoint (missing {', '.join(missing)})",
                            hint="re-run `bloger train-bilevel`")
    return ckpt


def _load_any(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"no checkpoint at {path}", hint="run `bloger train-bilevel` first")
    kind = "last_checkpoint" if path.name == SPECS["last_checkpoint"].filename else "checkpoint"
    try:
        return load_torch(path, SPECS[kind])
    except ArtifactError:
        other = "checkpoint" if kind == "last_checkpoint" else "last_checkpoint"
        return load_torch(path, SPECS[other])  # a renamed copy of the other kind is fine too


def build_recommender(ckpt: dict[str, Any], path: Path) -> Recommender:
    """The recommender of a checkpoint with its weights, in eval mode on the CPU."""
    model = Recommender(RecommenderConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise DamagedFile(f"{path}: the weights do not fit the stored model config "
                            f"({str(exc).splitlines()[0]})", hint="re-run `bloger train-bilevel --force`") from None
    return model.eval()


def check_resumable(ckpt: dict[str, Any], path: Path, config_hash: str, config: dict[str, Any],
                    inputs: dict[str, str]) -> None:
    """A checkpoint may only continue the same run: same config and the same input artifacts."""
    if ckpt["config_hash"] != config_hash:
        diffs = _config_diff(ckpt.get("config", {}), config)
        raise ConfigError(
            f"cannot resume from {path}: it was trained with another config ({diffs or 'hash ' + ckpt['config_hash']})",
            hint="resume with the same options, or start afresh without --resume",
        )
    changed = sorted(k.split(":", 1)[1] for k in inputs if ckpt["inputs"].get(k) != inputs[k])
    if changed:
        raise ConfigError(f"cannot resume from {path}: {', '.join(changed)} changed since it was written",
                          hint="start afresh without --resume")


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _config_diff(a, b, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return "; ".join(out)


def check_trained_on(ckpt: dict[str, Any], path: Path, sequences: ArtifactInfo) -> None:
    """A checkpoint only fits the workspace whose sequences it was trained on: item ids mean other items
    in another workspace, or after `prepare` re-ran."""
    trained_on = ckpt["inputs"].get("artifact:sequences")
    if trained_on != sequences.content_hash:
        raise DamagedFile(
            f"checkpoint {path} was trained on other sequences (recorded {trained_on}, "
            f"{sequences.path} is {sequences.content_hash}): another workspace, or prepare was re-run",
            hint="use it in its own workspace, or re-run `bloger train-bilevel` here")
