"""`bloger export-model`: the trained recommender with its semantic IDs, for serving elsewhere.

    --format torch   one file (`Served.to_file_dict`): weights, model config, IDs, item keys and titles,
                     vocabulary, popularity; `bloger recommend --model FILE --histories ...` serves it.
    --format hf      a folder `T5ForConditionalGeneration.from_pretrained` loads (recommender/hf_port.py),
                     with semantic_ids.parquet (item_key, item_id, codes, tokens), token_layout.json
                     and a README.md on decoding under the prefix constraint.

Either is written beside its destination under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bloger_cli.artifacts import temp_path_for
from bloger_cli.errors import ConfigError
from bloger_cli.recommender.vocab import EOS, PAD, SPECIAL
from bloger_cli.serving.bundle import Served, from_workspace
from bloger_cli.serving.config import ExportModelConfig
from bloger_cli.serving.hf_readme import README
from bloger_cli.workspace import Workspace

log = logging.getLogger(__name__)

def run(cfg: ExportModelConfig, ws: Workspace, *, force: bool = False) -> dict[str, Any]:
    """Export the workspace's model (best.pt unless cfg.checkpoint) as cfg.format to cfg.out."""
    started = time.perf_counter()
    _check_out(cfg.out, cfg.format, force)
    served = from_workspace(ws.latest_run(), cfg.checkpoint)
    tmp = temp_path_for(cfg.out)
    try:
        if cfg.format == "torch":
            torch.save(served.to_file_dict(), tmp)
        else:
            write_hf(served, tmp, cfg.out.name)
        _replace(tmp, cfg.out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
    c = served.model.config
    files = [f for f in cfg.out.rglob("*") if f.is_file()] if cfg.out.is_dir() else [cfg.out]
    size = sum(f.stat().st_size for f in files)
    log.info("exported %s (%d items) to %s", served.source, served.num_items, cfg.out)
    return {"out": str(cfg.out), "format": cfg.format, "source": served.source, "mode": served.mode,
            "items": served.num_items, "levels": c.levels, "codebook_size": c.codebook_size,
            "parameters": sum(p.numel() for p in served.model.parameters()), "bytes": size,
            "seconds": round(time.perf_counter() - started, 3)}


def _check_out(path: Path, fmt: str, force: bool) -> None:
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: directory {path.parent} does not exist",
                          hint=f"create it first (mkdir -p {path.parent})")
    if path.exists() and not force:
        raise ConfigError(f"--out {path} exists", hint="give --force to replace it")
    if path.exists() and (path.is_dir() != (fmt == "hf")):
        raise ConfigError(f"--out {path} is a {'directory' if path.is_dir() else 'file'}; --format {fmt} "
                          f"writes a {'folder' if fmt == 'hf' else 'file'}", hint="give another --out")


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing folder (--force) goes only once the new one is complete."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def write_hf(served: Served, folder: Path, name: str) -> None:
    """The Hugging Face folder (written at `folder`, to be called `name`): model weights and config, the ID
    table, the token layout, a README."""
    from bloger_cli.recommender.hf_port import to_hf_t5

    try:
        hf = to_hf_t5(served.model.cpu())
    except ImportError:
        raise ConfigError("--format hf needs the transformers package",
                          hint="pip install transformers, or export --format torch") from None
    folder.mkdir()
    hf.save_pretrained(folder)
    vocab = served.model.config.vocab
    codes = served.codes.cpu()
    tokens = vocab.tokens(codes).numpy().astype(np.int32)  # (N, L') each item's token ids
    table = pa.table({
        "item_key": served.item_keys, "item_id": pa.array(np.arange(len(codes)), pa.int32()),
        "codes": pa.array(list(codes.numpy().astype(np.int16)), pa.list_(pa.int16())),
        "tokens": pa.array(list(tokens), pa.list_(pa.int32())),
        **({"title": served.titles} if served.titles is not None else {}),
    })
    pq.write_table(table, folder / "semantic_ids.parquet", compression="zstd")
    layout = {"pad": PAD, "eos": EOS, "decoder_start": PAD, "levels": vocab.levels,
              "codebook_size": vocab.codebook_size, "vocab_size": vocab.size,
              "offsets": [vocab.offset(level) for level in range(vocab.levels)], "first_code_token": SPECIAL,
              "max_history": served.max_history, "items": len(codes), "mode": served.mode}
    (folder / "token_layout.json").write_text(json.dumps(layout, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(README.replace('"model-hf"', json.dumps(name)), encoding="utf-8")
