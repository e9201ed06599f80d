"""Accuracy check of `bloger baseline --model sasrec` against RecBole 1.2.1's SASRec on the same split.

    python benchmarks/sasrec_vs_recbole.py --recbole-python /tmp/recbole-venv/bin/python \\
        --data ../shared/datasets/ml-100k --epochs 20

RecBole is not a project dependency: install it in a separate environment
(`python -m venv /tmp/recbole-venv && /tmp/recbole-venv/bin/pip install torch recbole==1.2.1
"numpy<2" "pandas<2.3" "scipy<1.14" "setuptools<81"`: RecBole 1.2.1 uses np.float_ and pkg_resources)
and point --recbole-python at it. Both sides: the same atomic files, 5-core filtering (users and items with >= 5
interactions, iterated), leave-one-out ordered by time, history capped at 20 items, full ranking over
all items without masking history items, CE loss over all items, 2 blocks, 2 heads, hidden 64, inner
256, dropout 0.2, lr 1e-3, batch 256, weight decay 0, at most --epochs epochs with the best epoch chosen
on validation NDCG@10 (patience --patience). Prints test Recall@10 / NDCG@10 of both, their relative
difference, and the median seconds per epoch. Not part of the test suite; run it nice'd with
OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
started = time.perf_counter()
best_valid_score, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
fit_seconds = time.perf_counter() - started
test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
out = {"test_result": dict(test_result), "best_valid_result": dict(best_valid), "fit_seconds": fit_seconds,
       "users": dataset.user_num - 1, "items": dataset.item_num - 1, "interactions": dataset.inter_num,
       "epochs": trainer.cur_epoch if hasattr(trainer, "cur_epoch") else None}
print("RESULT " + json.dumps(out, default=float))
'''


def recbole(python: str, data: Path, args: argparse.Namespace, scratch: Path) -> dict:
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
        "seed": args.seed, "reproducibility": True, "use_gpu": False, "device": "cpu", "show_progress": False,
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
    return {"recall@10": test["recall@10"], "ndcg@10": test["ndcg@10"], "seconds": time.perf_counter() - started,
            "best_valid": result.get("best_valid_result")}


def ours(data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    bloger = str(Path(sys.executable).parent / "bloger")
    ws = scratch / "workspace"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([bloger, "-q", "prepare", "-w", ws, "--source", "recbole", "--input", data], check=True, env=env)
    started = time.perf_counter()
    out = subprocess.run([bloger, "-q", "baseline", "-w", ws, "--model", "sasrec", "--epochs", str(args.epochs),
                          "--patience", str(args.patience), "--seed", str(args.seed), "--device", "cpu",
                          "--k", "10", "--json"], check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout)["result"]
    return {**{k: result["metrics"][k] for k in ("recall@10", "ndcg@10")}, "seconds": time.perf_counter() - started,
            "seconds_per_epoch": result["seconds_per_epoch"], "epochs": result["epochs_run"],
            "best_epoch": result["best_epoch"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recbole-python", default="/tmp/recbole-venv/bin/python")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/ml-100k")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", choices=["ours", "recbole"], help="run one side only")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        if args.only != "recbole":
            rows["bloger"] = ours(args.data.resolve(), args, Path(tmp))
            print("bloger ", json.dumps(rows["bloger"]), flush=True)
        if args.only != "ours":
            rows["recbole"] = recbole(args.recbole_python, args.data.resolve(), args, Path(tmp))
            print("recbole", json.dumps(rows["recbole"]), flush=True)
    if len(rows) == 2:
        for metric in ("recall@10", "ndcg@10"):
            a, b = rows["bloger"][metric], rows["recbole"][metric]
            print(f"{metric}: bloger {a:.4f}  recbole {b:.4f}  relative difference {(a - b) / b:+.1%}")


if __name__ == "__main__":
    main()
