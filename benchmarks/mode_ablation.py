"""Modes side by side on one tokenized workspace: fixed, joint, bilevel (pcgrad) and bilevel (no
surgery), over several seeds; test Recall@10 / NDCG@10 (mean and spread) and level-1 codebook statistics
before and after.

    python benchmarks/mode_ablation.py --workspace bloger-work/quickstart --config examples/quickstart.toml
    python benchmarks/mode_ablation.py --workspace W --seeds 3 --epochs 8 --modes fixed,bilevel

Each (mode, seed) trains in its own copy of the workspace (under --out), from the [train-bilevel]
section of --config with mode, seed and epochs overridden, then `evaluate` on the test users.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

MODES = {"fixed": {"mode": "fixed"}, "joint": {"mode": "joint"},
         "bilevel": {"mode": "bilevel", "bilevel.surgery": "pcgrad"},
         "bilevel-none": {"mode": "bilevel", "bilevel.surgery": "none"}}


def level1(stats_path: Path) -> tuple[float, float]:
    import pyarrow.parquet as pq

    row = pq.read_table(stats_path).to_pylist()[0]
    return row["density"], row["entropy_bits"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True, help="a tokenized workspace (RQ-VAE)")
    p.add_argument("--config", help="TOML whose [train-bilevel] section is the base")
    p.add_argument("--out", default="bloger-work/ablation")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int)
    p.add_argument("--json", help="also write every (mode, seed) row to this JSON file")
    args = p.parse_args()

    import torch

    from bloger_cli.config import EvaluateConfig, resolve_config
    from bloger_cli.stages import train
    from bloger_cli.stages.evaluate import run as evaluate
    from bloger_cli.tokenizer.semantic_ids import level_stats, prefix_groups
    from bloger_cli.training.checkpoint import load_checkpoint
    from bloger_cli.workspace import Workspace

    source = Path(args.workspace)
    rows = []
    for mode in args.modes.split(","):
        for seed in range(args.seeds):
            ws_path = Path(args.out) / f"{mode}-{seed}"
            shutil.rmtree(ws_path, ignore_errors=True)
            shutil.copytree(source, ws_path, ignore=shutil.ignore_patterns("training", "*.pt.tmp*"))
            cfg = resolve_config("train-bilevel", Path(args.config) if args.config else None,
                                 {**MODES[mode], "seed": 42 + seed, "epochs": args.epochs})
            started = time.perf_counter()
            ws = Workspace(ws_path)
            result = train.run(cfg, ws, force=True).result
            metrics = evaluate(EvaluateConfig(), ws, force=True).result["metrics"]
            codes = load_checkpoint(ws.path("checkpoint"))["codes"].long()
            k = int(torch.load(ws.path("trained_tokenizer"), weights_only=False)["config"]["codebook_size"])
            first = level_stats(codes[:, :1], prefix_groups(codes[:, :1]), k, [0.0])[0]
            rows.append({"mode": mode, "seed": 42 + seed, **metrics, "density": first["density"],
                         "entropy": first["entropy_bits"], "s_per_epoch": result["seconds_per_epoch"],
                         "minutes": (time.perf_counter() - started) / 60})
            print(f"{mode} seed {42 + seed}: recall@10 {metrics['recall@10']:.4f} ndcg@10 {metrics['ndcg@10']:.4f} "
                  f"level-1 density {first['density']:.3f} entropy {first['entropy_bits']:.3f} "
                  f"({result['seconds_per_epoch']:.1f} s/epoch)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    density, entropy = level1(source / "codebook_stats.parquet")
    print(f"\nbefore training (tokenize): level-1 density {density:.3f}, entropy {entropy:.3f} bits")
    print(f"{'mode':14} {'recall@10':>17} {'ndcg@10':>17} {'density':>8} {'entropy':>8} {'s/epoch':>8}")
    for mode in args.modes.split(","):
        got = [r for r in rows if r["mode"] == mode]

        def fmt(key: str) -> str:
            values = [r[key] for r in got]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {spread:.4f}"
        print(f"{mode:14} {fmt('recall@10'):>17} {fmt('ndcg@10'):>17} "
              f"{statistics.mean(r['density'] for r in got):8.3f} {statistics.mean(r['entropy'] for r in got):8.3f} "
              f"{statistics.mean(r['s_per_epoch'] for r in got):8.1f}")


if __name__ == "__main__":
    main()
