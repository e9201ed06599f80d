"""Accuracy check of `bloger baseline --model sasrec` against RecBole 1.2.1's SASRec on the same split.

    python benchmarks/sasrec_vs_recbole.py --seeds 42 43 44 45 46 --epochs 30 --patience 5

RecBole is not a project dependency: install it in a separate environment
(`python -m venv /tmp/recbole-venv && /tmp/recbole-venv/bin/pip install torch recbole==1.2.1
"numpy<2" "pandas<2.3" "scipy<1.14" "setuptools<81"`: RecBole 1.2.1 uses np.float_ and pkg_resources)
and point --recbole-python at it. Both sides: the same atomic files, 5-core filtering (users and items with >= 5
interactions, iterated), leave-one-out ordered by time, history capped at 20 items, full ranking over
all items without masking history items, CE loss over all items, 2 blocks, 2 heads, hidden 64, inner
256, dropout 0.2, lr 1e-3, batch 256, weight decay 0, at most --epochs epochs with the best epoch chosen
on validation NDCG@10 (patience --patience). Each seed runs on both sides, --jobs runs at a time on one
thread each; rows go to --work/rows.jsonl as they finish (a second call runs only what is missing), and the
results to --out .md and .json: mean ± 95% interval per side, the paired relative difference, the median
seconds per epoch (training pass + validation). The last line printed is the speed ratio. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

from bloger_cli.report.collect import interval95

RECBOLE_RUNNER = r'''
import json, sys, time
import torch
_load = torch.load
torch.load = lambda *a, **k: _load(*a, **{"weights_only": False, **k})  # RecBole 1.2.1 pickles its config
torch.set_num_threads(1)
# recbole.quick_start imports ray, which no longer imports under NumPy 2: the same steps by hand
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_logger, init_seed
cfg = json.loads(sys.argv[1])
config = Config(model="SASRec", dataset=cfg.pop("dataset"), config_dict=cfg)
init_seed(config["seed"], config["reproducibility"])
init_logger(config)
dataset = create_dataset(config)
train, valid, test = data_preparation(config, dataset)
init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
model = get_model(config["model"])(config, train._dataset).to(config["device"])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
epochs = []  # seconds of each epoch: its training pass and its validation, as ours counts them
_train_epoch, _valid_epoch = trainer._train_epoch, trainer._valid_epoch
def timed_train(*a, **k):
    epochs.append(-time.perf_counter())
    return _train_epoch(*a, **k)
def timed_valid(*a, **k):
    out = _valid_epoch(*a, **k)
    epochs[-1] += time.perf_counter()
    return out
trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
started = time.perf_counter()
best_valid_score, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
fit_seconds = time.perf_counter() - started
test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
epochs.sort()
out = {"test_result": dict(test_result), "best_valid_result": dict(best_valid), "fit_seconds": fit_seconds,
       "users": dataset.user_num - 1, "items": dataset.item_num - 1, "interactions": dataset.inter_num,
       "epochs_run": len(epochs), "seconds_per_epoch": epochs[len(epochs) // 2] if epochs else None}
print("RESULT " + json.dumps(out, default=float))
'''


def recbole(python: str, data: Path, args: argparse.Namespace, seed: int, scratch: Path) -> dict:
    config = {
        "dataset": data.name, "data_path": str(data.parent), "checkpoint_dir": str(scratch / "recbole-saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        # RecBole's defaults filter nothing; the workspace's prepare does a 5-core
        "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)",
        "MAX_ITEM_LIST_LENGTH": 20, "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "epochs": args.epochs, "stopping_step": args.patience, "train_batch_size": 256, "eval_batch_size": 4096,
        "learning_rate": 1e-3, "weight_decay": 0.0, "n_layers": 2, "n_heads": 2, "hidden_size": 64,
        "inner_size": 256, "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "gelu",
        "seed": seed, "reproducibility": True, "use_gpu": False, "device": "cpu", "show_progress": False,
        "log_wandb": False, "state": "WARNING",
    }
    started = time.perf_counter()
    out = subprocess.run([python, "-c", RECBOLE_RUNNER, json.dumps(config)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=scratch)  # its log/ goes there
    line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"RecBole failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    test = result["test_result"]
    best = result.get("best_valid_result") or {}
    return {"recall@10": test["recall@10"], "ndcg@10": test["ndcg@10"], "seconds": time.perf_counter() - started,
            "val_recall@10": best.get("recall@10"), "val_ndcg@10": best.get("ndcg@10"),
            "seconds_per_epoch": result["seconds_per_epoch"], "epochs": result["epochs_run"],
            "users": result["users"], "items": result["items"], "interactions": result["interactions"]}


def ours(data: Path, args: argparse.Namespace, seed: int, scratch: Path) -> dict:
    bloger = str(Path(sys.executable).parent / "bloger")
    ws = scratch / "workspace"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not (ws / "catalog.duckdb").exists():
        subprocess.run([bloger, "-q", "prepare", "-w", ws, "--source", "recbole", "--input", data], check=True,
                       env=env)
    started = time.perf_counter()
    out = subprocess.run([bloger, "-q", "baseline", "-w", ws, "--run", f"sasrec-{seed}", "--model", "sasrec",
                          "--epochs", str(args.epochs), "--patience", str(args.patience), "--seed", str(seed),
                          "--device", "cpu", "--k", "10", "--json"],
                         check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout)["result"]
    return {**{k: result["metrics"][k] for k in ("recall@10", "ndcg@10")}, "seconds": time.perf_counter() - started,
            "val_recall@10": result["val_recall@10"], "val_ndcg@10": result["val_ndcg@10"],
            "seconds_per_epoch": result["seconds_per_epoch"], "epochs": result["epochs_run"],
            "best_epoch": result["best_epoch"], "users": result["val_users"], "items": result["items"]}


METRICS = ("recall@10", "ndcg@10", "val_recall@10", "val_ndcg@10")


def summarize(rows: list[dict]) -> dict:
    """Per side: mean ± 95% interval of each metric and the median seconds per epoch; per metric, the paired
    relative difference (bloger - RecBole) / RecBole over the seeds both sides ran."""
    out: dict = {"seeds": sorted({r["seed"] for r in rows}), "sides": {}, "paired": {}}
    for side in ("bloger", "recbole"):
        mine = [r for r in rows if r["side"] == side]
        if mine:
            out["sides"][side] = {"seeds": sorted(r["seed"] for r in mine),
                                  **{m: interval95([r[m] for r in mine]) for m in METRICS},
                                  "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in mine),
                                  "epochs": [r["epochs"] for r in sorted(mine, key=lambda r: r["seed"])]}
    by_seed = {(r["side"], r["seed"]): r for r in rows}
    seeds = sorted({seed for side, seed in by_seed if side == "bloger" and ("recbole", seed) in by_seed})
    for m in METRICS:
        if seeds:
            rel = [(by_seed["bloger", s][m] - by_seed["recbole", s][m]) / by_seed["recbole", s][m] for s in seeds]
            mean_b = statistics.mean(by_seed["bloger", s][m] for s in seeds)
            mean_r = statistics.mean(by_seed["recbole", s][m] for s in seeds)
            out["paired"][m] = {"seeds": seeds, "per_seed": rel, "relative": interval95(rel),
                                "relative_of_means": (mean_b - mean_r) / mean_r}
    return out


def _pm(pair: tuple[float, float], digits: int = 4) -> str:
    mean, half = pair
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown(summary: dict, command: str, machine: str, when: str) -> str:
    lines = ["# SASRec: bloger baseline against RecBole 1.2.1 (generated; do not edit)", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Seeds: {', '.join(map(str, summary['seeds']))} (each on both sides)  ", f"Finished: {when}", "",
             "ml-100k, 5-core, leave-one-out by time, history <= 20, full ranking over all items, CE loss, 2 blocks, "
             "2 heads, hidden 64, dropout 0.2, lr 1e-3, batch 256, best epoch on validation NDCG@10 (patience in "
             "the command). Mean ± 95% t interval over seeds; the paired row is the mean of (bloger - RecBole) / "
             "RecBole over the same seeds (seed numbers match, initial weights do not: two libraries).", "",
             "| side | seeds | test R@10 | test N@10 | valid R@10 | valid N@10 | s / epoch (median) | epochs run |",
             "|---|---|---|---|---|---|---|---|"]
    for side, entry in summary["sides"].items():
        lines.append(f"| {side} | {len(entry['seeds'])} | {_pm(entry['recall@10'])} | {_pm(entry['ndcg@10'])} | "
                     f"{_pm(entry['val_recall@10'])} | {_pm(entry['val_ndcg@10'])} | "
                     f"{entry['seconds_per_epoch']:.1f} | {', '.join(map(str, entry['epochs']))} |")
    if summary["paired"]:
        paired = summary["paired"]
        cells = " | ".join(f"{paired[m]['relative'][0]:+.1%} ± {paired[m]['relative'][1]:.1%}"
                           if not math.isnan(paired[m]["relative"][1]) else f"{paired[m]['relative'][0]:+.1%}"
                           for m in METRICS)
        lines.append(f"| relative difference (paired) | {len(paired['recall@10']['seeds'])} | {cells} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recbole-python", default="/tmp/recbole-venv/bin/python")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/ml-100k")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    p.add_argument("--only", choices=["bloger", "recbole"], help="run one side only")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sasrec-vs-recbole"),
                   help="scratch and rows.jsonl; runs already there are not run again")
    p.add_argument("--out", type=Path, default=Path("pipelines/results/sasrec-vs-recbole"),
                   help="results file stem (.md and .json)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows_file = args.work / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {(r["side"], r["seed"]) for r in rows}
    sides = [args.only] if args.only else ["bloger", "recbole"]
    todo = [(side, seed) for seed in args.seeds for side in sides if (side, seed) not in done]
    data = args.data.resolve()

    def one(side: str, seed: int) -> dict:
        scratch = args.work / f"{side}-{seed}"
        scratch.mkdir(exist_ok=True)
        if side == "bloger":
            result = ours(data, args, seed, scratch)
        else:
            result = recbole(args.recbole_python, data, args, seed, scratch)
        return {"side": side, "seed": seed, **result}

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(one, *job) for job in todo]):  # kept as each one finishes
            row = future.result()
            print(json.dumps(row), flush=True)
            with rows_file.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            rows.append(row)
    rows = [r for r in rows if r["seed"] in args.seeds]
    summary = summarize(rows)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch_version()}, {args.jobs} runs at a time "
               "x 1 thread, CPU only")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/sasrec_vs_recbole.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(summary, command, machine, when))
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "finished": when,
                                                         "rows": rows, "summary": summary}, indent=1, default=float))
    for m in ("recall@10", "ndcg@10"):
        if m in summary["paired"]:
            sb, sr = summary["sides"]["bloger"][m][0], summary["sides"]["recbole"][m][0]
            print(f"test {m}: bloger {sb:.4f}  recbole {sr:.4f}  relative difference "
                  f"{summary['paired'][m]['relative_of_means']:+.1%}")
    if "bloger" in summary["sides"] and "recbole" in summary["sides"]:
        a, b = summary["sides"]["bloger"]["seconds_per_epoch"], summary["sides"]["recbole"]["seconds_per_epoch"]
        print(f"seconds per epoch: bloger {a:.1f}  recbole {b:.1f}  ratio recbole/bloger {b / a:.2f}x")


def torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
