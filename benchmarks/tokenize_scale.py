"""How the item tokenizer scales: items/second and peak memory for 10^4 .. 10^6 random 384-d items.

    python benchmarks/tokenize_scale.py --sizes 1e4,1e5,1e6

Default model: RQ-VAE 384 -> [256, 128, 64] -> 32, L = 4 levels of K = 256 codes. Each (size, phase)
runs in a fresh process, so its peak RSS (os.wait4's ru_maxrss) is its own; "data MiB" is the child's
RSS right after building the N x 384 float32 matrix, so "peak - data" is what the phase itself added.
Phases:
- init:   k-means initialisation of the 4 codebooks (k-means++ and up to 50 Lloyd iterations per level
          on at most K x 256 = 65,536 encoded items; "items" and items/s count that sample),
- assign: codes for all N items with the initialised model ("fit s": its k-means init), in chunks of
          4,096 items on the CPU (+ quantisation and reconstruction errors), then collision groups,
          disambiguation and per-level statistics,
- train:  100 AdamW steps of batch 1024 (forward, loss, backward, step; the epoch's bookkeeping),
- rq-kmeans: the encoder-free method: residual k-means fitted on a 65,536-item sample ("fit s"), then
          codes, collisions and statistics for all N items ("s", items/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import rss_mib

DIM, STEPS, BATCH = 384, 100, 1024
PHASES = ("init", "assign", "train", "rq-kmeans")



def child(phase: str, n: int, threads: int | None) -> None:
    """Child mode: run one phase on N random items and print JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from bloger_cli.config import TokenizeConfig
    from bloger_cli.tokenizer.semantic_ids import assign_all, collision_report, disambiguate, level_stats, prefix_groups
    from bloger_cli.tokenizer.trainer import init_codebooks, new_tokenizer, run_epoch

    cfg = TokenizeConfig(method="rq-kmeans" if phase == "rq-kmeans" else "rqvae")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(n, DIM, generator=gen)
    data_rss = rss_mib()
    model = new_tokenizer(cfg, DIM)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    if phase in ("init", "assign"):
        init_codebooks(model, x, cfg.kmeans_iters, gen, cpu)
    if phase == "rq-kmeans":
        model.fit(x, cfg.kmeans_iters, gen)
    t1 = time.perf_counter()
    items = min(n, cfg.codebook_size * 256)  # init: the k-means sample
    if phase == "init":
        print(json.dumps({"fit_s": 0.0, "seconds": t1 - t0, "items": items, "data_rss": data_rss}))
        return
    items = n
    if phase in ("assign", "rq-kmeans"):
        a = assign_all(model, x, cpu)
        groups = prefix_groups(a.codes)
        report = collision_report(groups[-1])
        disambiguate(a.codes, torch.arange(n), groups[-1], cfg.codebook_size)
        level_stats(a.codes, groups, cfg.codebook_size, a.quantization_error)
    elif phase == "train":
        items = STEPS * BATCH
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rows = x[:items] if n >= items else x[torch.randint(n, (items,), generator=gen)]  # 100 batches' worth
        run_epoch(model, rows, optimizer, BATCH, gen)
    t2 = time.perf_counter()
    extra = {"collision_rate": report.collision_rate} if phase in ("assign", "rq-kmeans") else {}
    print(json.dumps({"fit_s": t1 - t0, "seconds": t2 - t1, "items": items, "data_rss": data_rss,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))


def measure(phase: str, n: int, threads: int | None) -> dict:
    argv = [sys.executable, __file__, "--child", phase, "--sizes", str(n)]
    argv += ["--threads", str(threads)] if threads else []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errs:
        proc = subprocess.Popen(argv, stdout=out, stderr=errs, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        errs.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{phase} {n} failed:\n{errs.read()[-3000:]}")
        row = json.loads(out.read())
    return {"phase": phase, "n": n, **row, "peak_rss": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated item counts")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # child mode: one phase
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.child is not None:
        child(args.child, sizes[0], args.threads)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU; "
          f"D = {DIM}, L = 4, K = 256, d = 32; load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'phase':>10} {'items':>10} {'fit s':>7} {'s':>8} {'items/s':>10} {'data MiB':>9} {'peak MiB':>9} "
          f"{'peak-data':>9} {'collisions':>10}")
    for phase in args.phases.split(","):
        for n in sizes:
            print(f"... {phase} {n:,}", file=sys.stderr, flush=True)
            r = measure(phase, n, args.threads)
            rate = r["items"] / r["seconds"] if r["seconds"] > 0 else float("inf")
            coll = f"{r['collision_rate']:10.4f}" if "collision_rate" in r else f"{'':>10}"
            print(f"{phase:>10} {n:>10,} {r['fit_s']:7.2f} {r['seconds']:8.2f} {rate:10,.0f} {r['data_rss']:9.0f} "
                  f"{r['peak_rss']:9.0f} {r['peak_rss'] - r['data_rss']:9.0f} {coll}", flush=True)


if __name__ == "__main__":
    main()
