"""Bilevel against fixed (issue 14, DESIGN.md section 7): the same data, model, step budget and
validation for every variant, several seeds, item-level test Recall@10 / NDCG@10 as mean ± 95% interval,
and a paired comparison per dataset (same seed = same initial weights and batch order in both modes).

    python benchmarks/bilevel_vs_fixed.py                      # 3 datasets x 5 seeds x (fixed, bilevel)
    python benchmarks/bilevel_vs_fixed.py --split valid --datasets ml-100k --seeds 2 \\
        --variants fixed,bilevel,bilevel-official,bilevel-paper-timing      # tuning: validation only

Each dataset is a TOML under pipelines/bilevel-vs-fixed/ (prepare, embed, tokenize and the shared
[train-bilevel] recipe); upstream stages run once in WORK/NAME, each (variant, seed) trains in its own
copy WORK/NAME-runs/VARIANT-sSEED. With --split test (the final run) the test users are decoded once
per run and the results go to --out (.md and .json); with --split valid nothing reads the test split and
the table shows the best validation metrics (what model selection may use).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "bilevel-vs-fixed"
DATASETS = ("ml-100k", "lastfm", "beauty")
# Each variant: --set style overrides of the dataset's [train-bilevel] recipe.
VARIANTS: dict[str, dict[str, object]] = {
    "fixed": {"mode": "fixed"},
    "bilevel": {"mode": "bilevel"},  # the defaults of this version
    "bilevel-paper-timing": {"mode": "bilevel", "bilevel.placement": "end", "bilevel.settle_steps": 0},
    "bilevel-official": {"mode": "bilevel", "bilevel.routing": "official", "bilevel.tok_loss": "mean",
                         "bilevel.surgery": "official"},
    "bilevel-mean": {"mode": "bilevel", "bilevel.routing": "official", "bilevel.tok_loss": "mean"},
    "bilevel-gentle": {"mode": "bilevel", "bilevel.max_churn": 0.1, "bilevel.tokenizer_warmup": 3},
    "bilevel-none": {"mode": "bilevel", "bilevel.surgery": "none"},
    "bilevel-4": {"mode": "bilevel", "bilevel.updates_per_epoch": 4, "bilevel.routing": "official",
                  "bilevel.tok_loss": "mean"},
}
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086]  # two-sided 95% Student t, df 1..20


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    t = T95[min(len(values) - 1, len(T95)) - 1]
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def upstream(name: str, work: Path, config: Path | None = None) -> Path:
    """prepare, embed and tokenize of a dataset (each a no-op when up to date)."""
    from bloger_cli.config import resolve_config
    from bloger_cli.stages.embed import run as embed
    from bloger_cli.stages.prepare import run as prepare
    from bloger_cli.stages.tokenize import run as tokenize
    from bloger_cli.workspace import Workspace

    config, root = config or CONFIGS / f"{name}.toml", work / name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cwd = Path.cwd()
    os.chdir(ROOT)  # the TOMLs name ../shared relative to the repository root
    try:
        for stage, run in (("prepare", prepare), ("embed", embed), ("tokenize", tokenize)):
            run(resolve_config(stage, config), Workspace(root))
    finally:
        os.chdir(cwd)
    return root


def one_run(name: str, source: Path, variant: str, seed: int, split: str, threads: int) -> dict:
    """Train one (variant, seed) on a copy of the dataset's workspace; evaluate the test split when asked."""
    import torch

    from bloger_cli.config import EvaluateConfig, resolve_config
    from bloger_cli.stages import train
    from bloger_cli.stages.evaluate import run as evaluate
    from bloger_cli.workspace import Workspace

    torch.set_num_threads(threads)
    root = source.parent / f"{name}-runs" / f"{variant}-s{seed}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("training", "*.tmp*", "cache"))
    options = {**VARIANTS[variant], "seed": seed}
    cfg = resolve_config("train-bilevel", CONFIGS / f"{name}.toml", options)
    started = time.perf_counter()
    result = train.run(cfg, Workspace(root), force=True).result
    row = {"dataset": name, "variant": variant, "seed": seed, "recipe": _recipe(name),
           "train_seconds": time.perf_counter() - started,
           "steps": result["steps"], "best_step": result.get("best_step"),
           "val_recall@10": result["val_recall@10"], "val_ndcg@10": result["val_ndcg@10"],
           **{key: result[key] for key in ("tokenizer_updates", "mean_churn", "mean_churn_weighted",
                                           "updates_skipped", "collision_rate", "level1_density",
                                           "level1_entropy") if key in result}}
    if split == "test":
        metrics = evaluate(EvaluateConfig(split="test", k=[5, 10], device="cpu"), Workspace(root), force=True)
        row.update({f"test_{key}": value for key, value in metrics.result["metrics"].items()})
    with open(source.parent / "rows.jsonl", "a") as fh:  # every finished run, for --from-rows
        fh.write(json.dumps(row) + "\n")
    print(f"{name} {variant} seed {seed}: " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                       if k.startswith(("val_", "test_")) and v is not None)
          + f" ({row['train_seconds']:.0f} s)", flush=True)
    return row


def _done_rows(work: Path, names: list[str], variants: list[str]) -> dict[tuple[str, str, int], dict]:
    """Runs finished earlier (WORK/rows.jsonl, the last of each (dataset, variant, seed)) whose recipe file
    is unchanged since: --resume skips them."""
    path = work / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {(r["dataset"], r["variant"], r["seed"]): r for r in rows
            if r["dataset"] in names and r["variant"] in variants and r.get("recipe") == _recipe(r["dataset"])}


def _recipe(name: str) -> str:
    """A hash of the dataset's recipe file and the variant table: runs of another recipe are not reused."""
    import hashlib

    blob = (CONFIGS / f"{name}.toml").read_bytes() + json.dumps(VARIANTS, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def summarize(rows: list[dict], split: str, variants: list[str]) -> dict:
    """Per dataset and variant: mean ± 95% interval; per bilevel variant, the paired difference to fixed."""
    prefix = "test_" if split == "test" else "val_"
    out: dict = {}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        by = {v: sorted((r for r in rows if r["dataset"] == name and r["variant"] == v), key=lambda r: r["seed"])
              for v in variants}
        table = {}
        for v, got in by.items():
            if not got:
                continue
            entry = {"seeds": [r["seed"] for r in got], "train_seconds": statistics.mean(r["train_seconds"] for r in got)}
            for metric in ("recall@10", "ndcg@10", "recall@5", "ndcg@5"):
                values = [r.get(prefix + metric) for r in got]
                if all(x is not None for x in values):
                    entry[metric] = interval(values)
            for metric in ("recall@10", "ndcg@10"):  # what model selection may look at
                values = [r.get("val_" + metric) for r in got]
                if all(x is not None for x in values):
                    entry["val_" + metric] = interval(values)
            for key in ("mean_churn", "mean_churn_weighted", "level1_density", "level1_entropy", "collision_rate"):
                if all(r.get(key) is not None for r in got):
                    entry[key] = statistics.mean(r[key] for r in got)
            base = {r["seed"]: r for r in by.get("fixed", [])}
            if v != "fixed" and base:
                for metric in ("recall@10", "ndcg@10"):
                    diffs = [r[prefix + metric] - base[r["seed"]][prefix + metric] for r in got if r["seed"] in base]
                    if diffs:
                        mean, half = interval(diffs)
                        entry[f"paired_{metric}"] = {"mean": mean, "half": half, "wins": sum(d > 0 for d in diffs),
                                                     "n": len(diffs), "significant": abs(mean) > half > 0}
            table[v] = entry
        out[name] = table
    return out


def markdown(summary: dict, args: argparse.Namespace, machine: str, started: str) -> str:
    split = "test" if args.split == "test" else "validation"
    lines = ["# Bilevel against fixed (generated; do not edit)", "",
             f"Command: `python benchmarks/bilevel_vs_fixed.py --datasets {args.datasets} --variants {args.variants} "
             f"--seeds {args.seeds} --split {args.split}`{' (these rows were summarized from WORK/rows.jsonl)' if args.from_rows else ''}  ",
             f"Machine: {machine}  ", f"Seeds: {', '.join(str(42 + i) for i in range(args.seeds))} (the same seed: the "
             "same initial weights and batch order in every variant)  ",
             f"{'Summarized' if args.from_rows else 'Started'}: {started}", "",
             f"Item-level {split} metrics, mean ± 95% t interval over seeds; 'paired' is the mean of (variant - "
             "fixed) over the same seeds with its 95% interval and the seeds where the variant won; * marks an "
             "interval that excludes 0; 'val N@10' is the mean best validation NDCG@10 (a fixed sample of 500 "
             "validation users), what selects a variant. Recipes: pipelines/bilevel-vs-fixed/NAME.toml (same model, "
             "steps and validation for every variant).", ""]
    for name, table in summary.items():
        lines += [f"## {name}", "", "| variant | seeds | R@10 | N@10 | paired R@10 | paired N@10 | val N@10 | churn / "
                  "update (weighted) | level-1 density, entropy | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
        for v, e in table.items():
            def pm(key: str) -> str:
                return f"{e[key][0]:.4f} ± {e[key][1]:.4f}" if key in e else "-"

            def paired(key: str) -> str:
                p = e.get(f"paired_{key}")
                return "-" if p is None else f"{p['mean']:+.4f} ± {p['half']:.4f}{'*' if p['significant'] else ''} " \
                    f"({p['wins']}/{p['n']})"
            churn = f"{e['mean_churn']:.3f} ({e['mean_churn_weighted']:.3f})" if "mean_churn" in e else "-"
            level = f"{e['level1_density']:.2f}, {e['level1_entropy']:.2f}" if "level1_density" in e else "-"
            val = f"{e['val_ndcg@10'][0]:.4f}" if "val_ndcg@10" in e else "-"
            lines.append(f"| {v} | {len(e['seeds'])} | {pm('recall@10')} | {pm('ndcg@10')} | {paired('recall@10')} | "
                         f"{paired('ndcg@10')} | {val} | {churn} | {level} | {e['train_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--variants", default="fixed,bilevel")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--work", default="bloger-work/bvf", help="workspaces (upstream and per run)")
    p.add_argument("--out", default="pipelines/results/bilevel-vs-fixed", help="results file stem (--split test)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-rows", action="store_true", help="summarize the runs in WORK/rows.jsonl (same recipes) "
                   "instead of training")
    p.add_argument("--resume", action="store_true", help="skip (dataset, variant, seed) runs already in "
                   "WORK/rows.jsonl with the same recipe")
    args = p.parse_args()
    import torch

    names, variants = args.datasets.split(","), args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [n for n in names if not (CONFIGS / f"{n}.toml").is_file()]
    if unknown:
        sys.exit(f"unknown variant or dataset: {', '.join(unknown)} (variants: {', '.join(VARIANTS)})")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{args.jobs} runs at a time x {args.threads} thread(s), CPU only"
    work = Path(args.work).resolve()
    sources = {name: work / name for name in names} if args.from_rows else {n: upstream(n, work) for n in names}
    if args.from_rows:  # summarize the runs already done with today's recipes (e.g. a long run stopped early)
        rows = [r for r in _done_rows(work, names, variants).values() if r["seed"] < 42 + args.seeds]
    else:
        jobs = [(n, sources[n], v, 42 + s, args.split, args.threads) for s in range(args.seeds) for n in names
                for v in variants]  # seed-major: every dataset and variant gets its seeds in step
        done = _done_rows(work, names, variants) if args.resume else {}
        todo = [job for job in jobs if (job[0], job[2], job[3]) not in done]
        with ProcessPoolExecutor(args.jobs) as pool:
            fresh = iter(list(pool.map(one_run, *zip(*todo))) if todo else [])
        rows = [done.get((j[0], j[2], j[3])) or next(fresh) for j in jobs]
    summary = summarize(rows, args.split, variants)
    text = markdown(summary, args, machine, started)
    print(text)
    if args.split == "test":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"machine": machine, "started": started, "args": vars(args),
                                                        "summary": summary, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
