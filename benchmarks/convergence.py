"""What convergence looks like on 2 CPU cores: one dataset's recipe trained to its early stop, with
length-grouped batches (this version) and without (every batch as long as its longest sample, which on
real data is nearly always the cap: the padding of earlier versions), the validation NDCG@10 against
wall time of both, and the test metrics of the best checkpoint.

    python benchmarks/convergence.py                       # pipelines/lastfm.toml -> pipelines/results/lastfm-convergence.*

Upstream stages run once in WORK/NAME; each side trains in WORK/NAME-convergence/SIDE. The last line
printed is the ratio of the wall times to the best validation (ungrouped / grouped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from bilevel_vs_fixed import ROOT, upstream

SIDES = {"grouped": {}, "ungrouped": {"train.bucket_group": "none"}}  # "none": None would mean "not given"


def train_side(name: str, source: Path, config: Path, side: str, threads: int, budget: str | None) -> dict:
    import pyarrow.parquet as pq
    import torch

    from bloger_cli.config import EvaluateConfig, resolve_config
    from bloger_cli.stages import train
    from bloger_cli.stages.evaluate import run as evaluate
    from bloger_cli.workspace import Workspace

    torch.set_num_threads(threads)
    root = source.parent / f"{name}-convergence" / side
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("training", "*.tmp*", "cache"))
    cfg = resolve_config("train-bilevel", config, {"mode": "fixed", "train.time_budget": budget, **SIDES[side]})
    assert (cfg.train.bucket_group is None) == (side == "ungrouped")
    started = time.perf_counter()
    result = train.run(cfg, Workspace(root), force=True).result
    wall = time.perf_counter() - started
    curve = [{"step": r["step"], "elapsed": r["elapsed"], "val_ndcg@10": r["val_ndcg_10"],
              "val_recall@10": r["val_recall_10"]}
             for r in pq.read_table(root / "history.parquet").to_pylist() if r["val_ndcg_10"] is not None]
    best = next(c for c in curve if c["step"] == result["best_step"])
    test = evaluate(EvaluateConfig(split="test", k=[5, 10], device="cpu"), Workspace(root), force=True).result
    stopped = result["steps"] - result["best_step"] >= cfg.train.patience * (result["steps"] // max(1, result["epochs_run"]))
    return {"side": side, "wall_seconds": wall, "ended_by": "early stop" if stopped else "the time cap", "steps": result["steps"], "best_step": result["best_step"],
            "seconds_to_best": best["elapsed"], "samples_per_s": result["samples_per_s"], "curve": curve,
            "test": test["metrics"]}


def resolve_seed(config: Path) -> int:
    from bloger_cli.config import resolve_config

    return resolve_config("train-bilevel", config).seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="pipelines/lastfm.toml")
    p.add_argument("--work", default="bloger-work/convergence")
    p.add_argument("--out", default="pipelines/results/lastfm-convergence")
    p.add_argument("--threads", type=int, default=1, help="threads per side (the sides run at the same time)")
    p.add_argument("--time-budget", help="cap each side's wall time (e.g. 15m); the table says whether a side "
                   "stopped early (converged) or at the cap")
    args = p.parse_args()
    import torch

    config = (ROOT / args.config).resolve()
    name = config.stem
    source = upstream(name, Path(args.work).resolve(), config)
    with ProcessPoolExecutor(len(SIDES)) as pool:  # side by side, each with --threads threads
        rows = list(pool.map(train_side, *zip(*[(name, source, config, side, args.threads, args.time_budget)
                                                 for side in SIDES])))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, both sides at once with "
               f"{args.threads} thread(s) each, CPU")
    lines = [f"# {name}: convergence on the CPU (generated; do not edit)", "",
             f"Command: `python benchmarks/convergence.py --config {args.config}"
             f"{' --time-budget ' + args.time_budget if args.time_budget else ''}`  ", f"Machine: {machine}  ",
             f"Seed: {resolve_seed(config)} (the config's; both sides)  ",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "Mode fixed, the recipe of the config, trained until early stopping (or the --time-budget cap); test "
             "metrics of best.pt.", "",
             "| batches | steps | best at step | s to best | s in all | ended by | samples/s | test R@5 | N@5 | R@10 | N@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["test"]
        lines.append(f"| {r['side']} | {r['steps']} | {r['best_step']} | {r['seconds_to_best']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {r['ended_by']} | {r['samples_per_s']:.0f} | {t['recall@5']:.4f} | {t['ndcg@5']:.4f} | "
                     f"{t['recall@10']:.4f} | {t['ndcg@10']:.4f} |")
    lines += ["", "Validation NDCG@10 against wall time (grouped batches):", "", "| step | seconds | val N@10 |",
              "|---|---|---|"]
    lines += [f"| {c['step']} | {c['elapsed']:.0f} | {c['val_ndcg@10']:.4f} |" for c in rows[0]["curve"]]
    text = "\n".join(lines) + "\n"
    out = ROOT / args.out
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": rows}, indent=1))
    print(text)
    print(f"seconds to the best validation, ungrouped / grouped: "
          f"{rows[1]['seconds_to_best'] / max(rows[0]['seconds_to_best'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
