"""Run by test_distributed.py under torchrun: one rank's part of the meta-gradient of test_bilevel's tiny
models (float64, look-ahead step 0.5) on a global batch of 3 samples split 2 + 1; rank 0 saves it."""

import sys

import torch
from test_bilevel import setup

from bloger_cli.recommender.batch import Batch
from bloger_cli.training.bilevel import distinct_items, meta_gradients
from bloger_cli.training.distributed import Distributed

dist = Distributed.from_env()
tokenizer, model, x, batch, _ = setup(torch.float64)
whole = Batch(*(t[:3] for t in batch))
index, share = dist.shard(torch.arange(3))
meta = meta_gradients(model, tokenizer, x, Batch(*(t[index] for t in whole)), eta=0.5, lam=0.5,
                      surgery_method="pcgrad", chunk=1, share=share, reduce=dist.sum_,
                      tok_items=distinct_items(whole.history, whole.target))
if dist.main:
    torch.save({"grads": meta.grads, "losses": [meta.inner_loss, meta.outer_loss, meta.tok_loss]}, sys.argv[1])
dist.close()
