"""Decoding speed: our batched constrained beam search vs HF `generate` with a Python-trie constraint.

    python benchmarks/decode_speed.py                          # random model, 12,101-item catalog
    python benchmarks/decode_speed.py --workspace bloger-work/ml-100k   # a trained model, its test users
    python benchmarks/decode_speed.py --device cuda            # on a GPU (the trie stays in Python)

Both sides decode the same users with the same weights (ours copied into T5ForConditionalGeneration by
`to_hf_t5`) and the same beam width (20), returning the top 10 items:
- ours: `recommend(..., method="beam")`: per-level prefix tables as a mask before the top-k over
  beam x K, KV cache, batched over users (`--batch`), no Python per token;
- HF:   `generate(num_beams=20, num_return_sequences=10, prefix_allowed_tokens_fn=trie)`, the official
  BLOGER/TIGER code's decoder: a dict from each prefix to its allowed next tokens, called per beam and
  per step.
By default the catalog is 12,101 items (Beauty's size) with random unique 4-level codes (K = 256) and the
model is the paper's (4 + 4 layers, d 128) with random weights; `--workspace` takes best.pt, its codes
and the workspace's test users instead. Reported: users/s of each side, the ratio, and the mean overlap
of the two top-10 lists (HF also scores EOS, ours does not, so small differences are expected), plus
Recall@10 of both with --workspace. Target: ours >= 20x HF users/s with the same top-10.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bloger_cli.recommender.config import RecommenderConfig
from bloger_cli.recommender.decoding import PrefixIndex, recommend
from bloger_cli.recommender.hf_port import to_hf_t5
from bloger_cli.recommender.model import Recommender
from bloger_cli.recommender.vocab import EOS, PAD


def random_setup(args: argparse.Namespace) -> tuple[Recommender, torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """Paper-sized random model, `--items` unique random codes, `--users` random histories of 20 items."""
    g = torch.Generator().manual_seed(0)
    levels, k = 4, 256
    codes = torch.unique(torch.randint(0, k, (args.items * 2, levels), generator=g), dim=0)
    codes = codes[torch.randperm(len(codes), generator=g)[:args.items]]
    torch.manual_seed(0)
    model = Recommender(RecommenderConfig(levels=levels, codebook_size=k, soft_levels=levels - 1)).eval()
    history = torch.randint(0, args.items, (args.users, 20), generator=g)
    input_ids = model.config.vocab.tokens(codes[history]).flatten(1)
    return model, codes, input_ids, torch.ones_like(input_ids, dtype=torch.bool), None


def workspace_setup(args: argparse.Namespace):
    """best.pt of a workspace, its codes, and its first `--users` test users."""
    from bloger_cli.data.samples import load_split
    from bloger_cli.recommender.batch import make_batch
    from bloger_cli.training.checkpoint import build_recommender, load_checkpoint

    path = Path(args.workspace) / "best.pt"
    ckpt = load_checkpoint(path)
    model = build_recommender(ckpt, path)
    codes = ckpt["codes"].long()
    samples = load_split(Path(args.workspace) / "sequences.parquet", "test")
    samples = samples.select(torch.arange(min(args.users, len(samples))))
    batch = make_batch(samples, codes, model.config.vocab)
    return model, codes, batch.input_ids, batch.attention_mask, samples.target


def elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def ours(model, codes, input_ids, mask, args) -> tuple[torch.Tensor, float]:
    device = input_ids.device
    index = PrefixIndex.build(codes, torch.arange(len(codes)), model.config.codebook_size).to(device)
    recommend(model, input_ids[:2], mask[:2], index, k=args.k, beam=args.beam)  # warm up
    started, out = time.perf_counter(), []
    lengths = mask.sum(dim=1)  # (B,) history tokens: left-aligned, so a batch can drop the padding past its longest
    order = torch.argsort(lengths, stable=True)  # as `evaluate`: users of similar length decode together
    with torch.inference_mode():
        for s in range(0, len(input_ids), args.batch):
            users = order[s:s + args.batch]
            width = max(1, int(lengths[users].max()))
            out.append(recommend(model, input_ids[users, :width], mask[users, :width], index, k=args.k,
                                 beam=args.beam).items)
    seconds = elapsed(started, device)
    items = torch.empty_like(torch.cat(out))
    items[order] = torch.cat(out)  # back to the users' order
    return items.cpu(), seconds


def hf(model, codes, input_ids, mask, args) -> tuple[torch.Tensor, float]:
    net = to_hf_t5(model).eval()
    vocab = model.config.vocab
    tokens = vocab.tokens(codes).tolist()
    trie: dict[tuple[int, ...], list[int]] = {}
    for seq in tokens:
        for depth in range(len(seq)):
            trie.setdefault(tuple(seq[:depth]), []).append(seq[depth])
        trie[tuple(seq)] = [EOS]
    trie = {prefix: sorted(set(nxt)) for prefix, nxt in trie.items()}
    item_of = {tuple(seq): i for i, seq in enumerate(tokens)}

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.get(tuple(sent.tolist()[1:]), [PAD])  # sent[0] is the decoder start token

    n = min(args.hf_users, len(input_ids))
    started, rows = time.perf_counter(), []
    with torch.inference_mode():
        for s in range(0, n, args.hf_batch):
            users = slice(s, s + args.hf_batch)
            seqs = net.generate(input_ids=input_ids[users], attention_mask=mask[users].long(),
                                num_beams=args.beam, num_return_sequences=args.k, max_new_tokens=vocab.levels + 1,
                                prefix_allowed_tokens_fn=allowed, do_sample=False, early_stopping=True)
            for seq in seqs.view(-1, args.k, seqs.shape[-1]).tolist():
                rows.append([item_of.get(tuple(t[1:1 + vocab.levels]), -1) for t in seq])
    return torch.tensor(rows), elapsed(started, input_ids.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", help="use WORKSPACE/best.pt, its codes and test users")
    p.add_argument("--items", type=int, default=12_101, help="catalog size of the random setup")
    p.add_argument("--users", type=int, default=512, help="users decoded by ours")
    p.add_argument("--hf-users", type=int, default=32, help="users decoded by HF (the first of ours)")
    p.add_argument("--batch", type=int, default=256, help="users per batch, ours")
    p.add_argument("--hf-batch", type=int, default=8, help="users per generate call, HF")
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, codes, input_ids, mask, target = (workspace_setup if args.workspace else random_setup)(args)
    device = torch.device(args.device)
    model, input_ids, mask = model.to(device).eval(), input_ids.to(device), mask.to(device)
    mine, mine_s = ours(model, codes, input_ids, mask, args)
    theirs, theirs_s = hf(model, codes, input_ids, mask, args)
    n = len(theirs)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(mine[:n].tolist(), theirs.tolist())) / (n * args.k)
    ours_rate, hf_rate = len(mine) / mine_s, n / theirs_s
    print(f"{len(codes):,} items, beam {args.beam}, top {args.k}, {args.device}, {torch.get_num_threads()} threads, "
          f"{'trained model: ' + args.workspace if args.workspace else 'random paper-sized model'}")
    print(f"ours: {len(mine)} users in {mine_s:.2f} s = {ours_rate:.1f} users/s")
    print(f"HF:   {n} users in {theirs_s:.2f} s = {hf_rate:.2f} users/s")
    print(f"top-{args.k} overlap on the {n} shared users: {overlap:.3f}")
    if target is not None:
        hit_ours = (mine[:n] == target[:n, None]).any(1).float().mean()
        hit_hf = (theirs == target[:n, None]).any(1).float().mean()
        print(f"Recall@{args.k} on the {n} shared users: ours {hit_ours:.4f}, HF {hit_hf:.4f}")
    print(f"ours / HF users/s: {ours_rate / hf_rate:.1f}x")


if __name__ == "__main__":
    main()
