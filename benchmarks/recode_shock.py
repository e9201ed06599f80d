"""What a re-coding right before validation costs (issue 14, cause 1), at no training cost: decode a
bilevel run's best.pt once with the codes it was saved with (those after its last tokenizer update)
and once with the codes from before that update (the codes the recommender actually trained on).

    python benchmarks/recode_shock.py bloger-work/bvf/ml-100k-runs/bilevel-paper-timing-s42 [--split valid]

Needs a checkpoint written by this version (it keeps `codes_before_update`). Prints both metric rows,
the share of items and of the split's targets whose ID differs, and as its last line the ratio of
Recall@10 after / before.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspace")
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    p.add_argument("--k", default="10")
    args = p.parse_args()

    from bloger_cli.artifacts import SPECS
    from bloger_cli.config import EvaluateConfig
    from bloger_cli.data.samples import load_split
    from bloger_cli.stages.evaluate import run as evaluate
    from bloger_cli.training.checkpoint import load_checkpoint, save_atomic
    from bloger_cli.workspace import Workspace

    ws = Workspace(Path(args.workspace))
    best = load_checkpoint(ws.path("checkpoint"))
    if best.get("codes_before_update") is None:
        raise SystemExit(f"{ws.path('checkpoint')} has no codes_before_update: a fixed run, or a run of an older "
                         "version, or no tokenizer update before its best validation")
    after, before = best["codes"].long(), best["codes_before_update"].long()
    targets = load_split(ws.path("sequences"), args.split).target
    moved = (after != before).any(dim=1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        swapped = dict(best, codes=best["codes_before_update"])
        meta = {key: str(value) for key, value in swapped.pop("metadata").items()}
        path = Path(tmp) / SPECS["checkpoint"].filename
        save_atomic(swapped, path, meta)
        for name, checkpoint in (("codes after the last update (as saved)", None), ("codes before it", path)):
            cfg = EvaluateConfig(split=args.split, k=args.k, checkpoint=checkpoint, device="cpu")
            rows[name] = evaluate(cfg, ws, force=True).result["metrics"]
    print(f"best.pt of {ws.root} (step {best['step']}), {args.split} split")
    print(f"items whose ID the last update changed: {float(moved.float().mean()):.3f}; "
          f"{args.split} targets: {float(moved[targets].float().mean()):.3f}")
    for name, metrics in rows.items():
        print(f"{name:40} " + "  ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    a, b = rows["codes after the last update (as saved)"], rows["codes before it"]
    key = f"recall@{args.k.split(',')[-1]}"
    print(f"{key} after / before: {a[key] / max(b[key], 1e-12):.3f}")


if __name__ == "__main__":
    main()
