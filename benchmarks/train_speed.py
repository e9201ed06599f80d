"""Training speed of our recommender vs Hugging Face T5 fed the official code's dense soft mixing.

    python benchmarks/train_speed.py                      # paper model, batch 256, history 20, 4 x 256
    python benchmarks/train_speed.py --batch 64 --steps 3 # quicker
    python benchmarks/train_speed.py --device cuda        # on a GPU (peak memory: CUDA allocator's)

One training step = forward, next-token cross-entropy, backward, AdamW step, on random data of the
paper's shape: 20 history items of L' = 4 tokens (80 encoder tokens), 5 decoder tokens, vocabulary
2 + 4 x 256 = 1,026, model 4 + 4 layers, d_model 128, 6 heads, d_kv 64, d_ff 1024, dropout 0.1. Sides:

- ours ids:     our model on token ids (the fixed mode's step), with our default attention dropout
                (= dropout, as HF T5) and with attention_dropout 0,
- ours mixed:   our model with soft assignments (B, H, L, K) on every input and target item: the
                mixed representation E[hard] + (p_l @ E_l - sg[...]) per level (the bi-level modes),
- ours mixed, attention_dropout 0: the same without dropout on the attention weights,
- HF dense:     transformers' T5ForConditionalGeneration of the same size (our weights, via to_hf_t5)
                fed as the official BLOGER code does: a dense (B, T, 1026) soft-assignment tensor times
                the embedding table for the encoder and the decoder inputs (`inputs_embeds`).

Each side runs in a fresh process, so peak memory (ru_maxrss) is its own; "peak MiB" is the peak RSS
minus the RSS after the model, optimiser and data were built (with --device cuda: the CUDA allocator's
peak minus what was allocated then). On a shared CPU, time is noisy: torch's threads spin against
another process's, so compare sides of one run and try --threads 1. Target: ours >= 3x HF's samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import rss_mib

SIDES = ("ours-ids", "ours-ids-noattn", "ours-mixed", "ours-mixed-noattn", "hf-dense")
LABELS = {"ours-ids": "ours, token ids", "ours-ids-noattn": "ours, token ids, attention_dropout 0",
          "ours-mixed": "ours, mixed representation",
          "ours-mixed-noattn": "ours, mixed, attention_dropout 0", "hf-dense": "HF T5, dense soft mixing"}



def child(side: str, args: argparse.Namespace) -> dict:
    """Run `args.steps` timed steps of one side (after `args.warmup` untimed ones)."""
    import torch

    from bloger_cli.recommender.config import RecommenderConfig
    from bloger_cli.recommender.hf_port import to_hf_t5
    from bloger_cli.recommender.model import Recommender
    from bloger_cli.recommender.vocab import EOS, PAD

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    levels, k, soft = args.levels, args.codebook_size, args.levels - 1  # + a disambiguation level
    config = RecommenderConfig(levels=levels, codebook_size=k, soft_levels=soft, d_model=args.d_model,
                               num_layers=args.layers, num_heads=args.heads, d_kv=args.d_kv, d_ff=args.d_ff,
                               dropout=0.1, attention_dropout=0.0 if side.endswith("-noattn") else None)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # build the model and data there; reset before timing (the default-device mode costs per op)
        torch.set_default_device(device)
    model = Recommender(config)
    vocab, b, h = config.vocab, args.batch, args.history
    codes = torch.randint(0, k, (b, h + 1, levels))  # history items, then the target
    target = vocab.tokens(codes[:, h])  # (B, L')
    decoder_input_ids = torch.cat([torch.full((b, 1), PAD), target], dim=1)
    labels = torch.cat([target, torch.full((b, 1), EOS)], dim=1)
    probs = torch.softmax(torch.randn(b, h + 1, soft, k), dim=-1)  # the tokenizer's soft assignments
    # real history lengths (--lengths): our side takes length-grouped batches trimmed to their longest
    # sample, HF the same samples padded to `history` items as the official code does
    widths, step_masks = [h] * (args.warmup + args.steps), [None] * (args.warmup + args.steps)
    if args.lengths:
        from bloger_cli.data.samples import load_split
        from bloger_cli.training.sampler import epoch_batches

        lengths = load_split(Path(args.lengths), "train").lengths().clamp_max(h)
        batches = [x for x in epoch_batches(0, 1, lengths, b, None if side == "hf-dense" else 50) if len(x) == b]
        if side != "hf-dense":  # a few steps stand for an epoch: batches at evenly spaced quantiles of the widths
            batches.sort(key=lambda x: int(lengths[x].max()))
            batches = [batches[int((i + 0.5) * len(batches) / len(widths))] for i in range(len(widths))]
            warm = batches.pop(len(batches) // 2)
            batches = [warm, *batches]  # the warm-up step takes the median width
        batches = batches[:len(widths)]
        step_masks = [torch.arange(h)[None, :] < lengths[x][:, None] for x in batches]  # (B, H) items present
        if side != "hf-dense":
            widths = [int(lengths[x].max()) for x in batches]

    def step_inputs(i: int) -> tuple:
        """Token ids and mask of step i: (B, W*L') each, W its width."""
        w = widths[i]
        ids = vocab.tokens(codes[:, :w]).flatten(1)
        present = torch.ones(b, w, dtype=torch.bool) if step_masks[i] is None else step_masks[i][:, :w]
        return ids, present.repeat_interleave(levels, dim=1)
    inputs = [step_inputs(i) for i in range(len(widths))]
    input_ids, mask = inputs[0]

    if side == "hf-dense":
        net = to_hf_t5(model).train()
        dense_in = torch.zeros(b, h, levels, vocab.size)
        dense_dec = torch.zeros(b, levels + 1, vocab.size)
        dense_dec[:, 0, PAD] = 1.0
        for level in range(levels):  # one-hot on the hard token, soft probabilities on the tokenizer levels
            blk = vocab.block(level)
            if level < soft:
                dense_in[:, :, level, blk] = probs[:, :h, level]
                dense_dec[:, level + 1, blk] = probs[:, h, level]
            else:
                dense_in[:, :, level].scatter_(-1, input_ids.view(b, h, levels)[:, :, level:level + 1], 1.0)
                dense_dec[:, level + 1].scatter_(-1, target[:, level:level + 1], 1.0)
        dense_in = dense_in.flatten(1, 2)  # (B, T, V): the tensor the official code builds

        def loss_fn(i: int):
            table = net.get_input_embeddings().weight
            return net(inputs_embeds=dense_in @ table, attention_mask=inputs[i][1].long(),
                       decoder_inputs_embeds=dense_dec @ table, labels=labels).loss
        params = net.parameters()
    else:
        model.train()
        def loss_fn(i: int):
            w = widths[i]
            kw = {} if side.startswith("ours-ids") else {"input_probs": probs[:, :w], "decoder_probs": probs[:, h]}
            return model(*inputs[i], decoder_input_ids, labels, **kw).loss
        params = model.parameters()
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)

    def step(i: int):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(i)
        loss.backward()
        optimizer.step()
        return float(loss)

    if cuda:
        torch.set_default_device(None)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / 2**20 if cuda else rss_mib()
    for i in range(args.warmup):
        step(i)
    started = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)  # float(loss) waits for the GPU, so the clock sees every step's work
    seconds = time.perf_counter() - started
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "samples_per_s": args.steps * b / seconds, "step_s": seconds / args.steps,
            "peak_mib": peak - base, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--history", type=int, default=20, help="history items (x L' encoder tokens)")
    p.add_argument("--levels", type=int, default=4, help="tokens per item L' (3 tokenizer levels + 1)")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--d-kv", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--lengths", help="a workspace's sequences.parquet: real history lengths of its training split "
                   "(ours: length-grouped, trimmed batches; HF: padded to --history)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--side", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.side:
        print(json.dumps(child(args.side, args)))
        return
    unknown = set(args.sides.split(",")) - set(SIDES)
    if unknown:
        p.error(f"unknown sides {sorted(unknown)}; choose from {', '.join(SIDES)}")
    options = {k: v for k, v in vars(args).items() if k not in ("sides", "side")}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]  # the child gets the resolved options
    rows = []
    for side in args.sides.split(","):
        print(f"... {side}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, *argv, "--side", side], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{side} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    hf = next((r for r in rows if r["side"] == "hf-dense"), None)
    print(f"batch {args.batch}, history {args.history} x {args.levels} tokens, vocabulary "
          f"{2 + args.levels * args.codebook_size}, {args.device}, {rows[0]['threads']} threads, "
          f"{args.steps} steps per side; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'side':36} {'samples/s':>10} {'s/step':>8} {'peak MiB':>9} {'x HF speed':>10} {'x HF memory':>11}")
    for r in rows:
        speed = f"{r['samples_per_s'] / hf['samples_per_s']:.2f}" if hf else "-"
        memory = f"{r['peak_mib'] / hf['peak_mib']:.2f}" if hf and hf["peak_mib"] > 0 else "-"
        print(f"{LABELS[r['side']]:36} {r['samples_per_s']:10.1f} {r['step_s']:8.3f} {r['peak_mib']:9.0f} "
              f"{speed:>10} {memory:>11}")
    ours = next((r for r in rows if r["side"] == "ours-ids"), None)
    if hf and ours:
        print(f"ours (token ids{', length-grouped' if args.lengths else ''}) / HF T5 samples/s: "
              f"{ours['samples_per_s'] / hf['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
