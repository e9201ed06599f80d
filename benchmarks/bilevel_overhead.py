"""What the bi-level meta step costs: seconds per epoch of mode bilevel over mode fixed, and peak memory
of one meta step over one ordinary step.

    python benchmarks/bilevel_overhead.py                     # paper model, batch 256, Beauty-sized
    python benchmarks/bilevel_overhead.py --steps-per-epoch 100 --batch 64

Epoch time: an "epoch" of `--steps-per-epoch` ordinary steps (Beauty: ~600 at batch 256) is timed from
`--timed-steps` measured steps; bilevel adds `--updates` meta steps per epoch (look-ahead, second-order
gradient into the RQ-VAE, surgery, tokenizer step, and the refresh of all `--items` items' codes), each
timed on its own. The ratio is (steps x step + updates x update) / (steps x step). Targets: <= 1.05 at
1 update per epoch, <= 1.20 at 4 (the paper reports 1.12 on a GPU).

Memory (`--chunk`: bilevel.meta_chunk, the samples in the second-order graph at a time): each kind of step
runs in a fresh process (ru_maxrss); "peak MiB" is its peak RSS minus the RSS
once model, tokenizer and data exist. Two meta steps follow each other, so a graph that outlived its step
would show. Target: meta step <= 2 GiB (the official code: 13.2 GiB, then 22.9 GiB for two).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import rss_mib


def child(kind: str, args: argparse.Namespace) -> dict:
    import torch

    from bloger_cli.config import TrainBilevelConfig
    from bloger_cli.data.samples import Samples
    from bloger_cli.recommender.batch import make_batch
    from bloger_cli.recommender.config import RecommenderConfig
    from bloger_cli.recommender.model import Recommender
    from bloger_cli.recommender.vocab import Vocab
    from bloger_cli.tokenizer.rqvae import RQVAE, RQVAEConfig
    from bloger_cli.tokenizer.semantic_ids import semantic_ids
    from bloger_cli.tokenizer.trainer import init_codebooks
    from bloger_cli.training.bilevel import meta_gradients
    from bloger_cli.training.state import TrainData, new_state
    from bloger_cli.training.steps import commit_codes, fixed_step, recode

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    levels, k, n = 3, 256, args.items
    tokenizer = RQVAE(RQVAEConfig.resolve(384, 32, levels, k, None, 0.0, 0.25))
    x = torch.randn(n, 384)
    init_codebooks(tokenizer, x, 20, torch.Generator().manual_seed(0), torch.device("cpu"))  # as tokenize does
    cfg = TrainBilevelConfig(mode="bilevel", batch_size=args.batch, device="cpu")
    model = Recommender(RecommenderConfig(levels=levels + 1, codebook_size=k, soft_levels=levels,
                                          **cfg.model.model_dump()))
    state = new_state(model, cfg, args.steps_per_epoch, tokenizer)
    g = torch.Generator().manual_seed(0)
    samples = Samples(torch.arange(args.batch * 4), torch.randint(0, n, (args.batch * 4, 20), generator=g),
                      torch.randint(0, n, (args.batch * 4,), generator=g))
    vocab = Vocab(levels + 1, k)
    data = TrainData(samples, samples, torch.zeros(n, levels + 1, dtype=torch.long), torch.arange(n), vocab, x)
    data.codes.copy_(semantic_ids(tokenizer, x, torch.arange(n), k, torch.device("cpu")).codes)  # real, disambiguated
    step = fixed_step(cfg, None, torch.device("cpu"))
    batches = [make_batch(samples.select(torch.arange(i * args.batch, (i + 1) * args.batch)), data.codes, vocab)
               for i in range(4)]

    def meta(i: int) -> None:
        out = meta_gradients(model, tokenizer, x, batches[i % 4], eta=cfg.train.lr, lam=0.5, surgery_method="pcgrad",
                             chunk=args.chunk or None)
        for name, p in tokenizer.named_parameters():
            p.grad = out.grads[name]
        state.tokenizer_optimizer.step()
        commit_codes(state, data, recode(state, data))

    run = (lambda i: step(state, batches[i % 4])) if kind == "step" else meta
    base = rss_mib()
    run(0)  # warm-up (allocator, first-call costs)
    started = time.perf_counter()
    for i in range(args.timed_steps):
        run(i + 1)
    seconds = (time.perf_counter() - started) / args.timed_steps
    return {"kind": kind, "seconds": seconds,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--items", type=int, default=12_101)
    p.add_argument("--steps-per-epoch", type=int, default=600, help="Beauty at batch 256: ~600")
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=32, help="bilevel.meta_chunk (0: the whole batch at once)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kind", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.kind:
        print(json.dumps(child(args.kind, args)))
        return
    rows = {}
    for kind in ("step", "meta"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--kind", kind], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{kind} failed:\n{out.stderr[-2000:]}")
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    step, meta = rows["step"], rows["meta"]
    print(f"paper model, batch {args.batch}, {args.items:,} items, {args.steps_per_epoch} steps per epoch, "
          f"meta step in slices of {args.chunk or args.batch} samples")
    print(f"ordinary step: {step['seconds']:.2f} s, peak {step['peak_mib']:.0f} MiB")
    print(f"meta step (+ tokenizer step + codes of all items): {meta['seconds']:.2f} s, peak {meta['peak_mib']:.0f} MiB "
          f"({meta['peak_mib'] / max(step['peak_mib'], 1):.2f}x the ordinary step)")
    epoch = args.steps_per_epoch * step["seconds"]
    for updates in (1, 2, 4):
        print(f"bilevel / fixed seconds per epoch at {updates} update(s) per epoch: "
              f"{(epoch + updates * meta['seconds']) / epoch:.3f}")


if __name__ == "__main__":
    main()
