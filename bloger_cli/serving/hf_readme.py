'''The README.md that `bloger export-model --format hf` puts in the folder: how to load the model and
decode under the prefix constraint. The test runs its Python block against `bloger recommend`.'''

README = """# A bloger generative recommender (Hugging Face format)

Written by `bloger export-model --format hf`. The model is a `T5ForConditionalGeneration`; an item is
a short semantic ID of `levels` codes, each code one token. The folder holds:

- `config.json`, `model.safetensors`, `generation_config.json`: the model (`from_pretrained(folder)`).
- `semantic_ids.parquet`: one row per item: `item_key` (the raw key), `item_id`, `codes` (one per
  level), `tokens` (the codes as token ids), and `title` when the items have one.
- `token_layout.json`: the vocabulary. Token 0 is pad (also the decoder start), token 1 is eos, then
  one block of `codebook_size` tokens per level: code c of level l is token `offsets[l] + c`
  (`offsets[l] = 2 + l * codebook_size`). `max_history` is the number of items the model reads.

The encoder reads a user's last `max_history` items, oldest first, each as its `levels` tokens, with
no eos. The decoder starts from pad and generates one item's `levels` tokens; an item's score is the
sum of the log-probabilities of its tokens. Decoding must stay on real items: at step l only the
codes that continue a prefix of some item's ID are allowed (the prefix constraint). Both functions
below keep it: `recommend_exact` scores every item (small catalogs; the exact ranking) and
`recommend_beam` runs `generate` with a prefix trie (large catalogs). `bloger recommend` does the
same with a batched, tensorised beam search (and can exclude items the user already has).

```python
import json

import pyarrow.parquet as pq
import torch
from transformers import T5ForConditionalGeneration

folder = "model-hf"  # the path of this folder
model = T5ForConditionalGeneration.from_pretrained(folder).eval()
layout = json.load(open(f"{folder}/token_layout.json"))
ids = pq.read_table(f"{folder}/semantic_ids.parquet").to_pydict()
keys = ids["item_key"]
tokens = torch.tensor(ids["tokens"])  # (N, levels): each item's token ids
row = {key: i for i, key in enumerate(keys)}
item_of = {tuple(t): i for i, t in enumerate(tokens.tolist())}


def encoder_input(history):
    # item keys, oldest first -> (1, S) token ids and mask; unknown keys are dropped (at least one must be known)
    known = [row[key] for key in history if key in row][-layout["max_history"]:]
    input_ids = tokens[known].reshape(1, -1)
    return input_ids, torch.ones_like(input_ids)


@torch.no_grad()
def recommend_exact(history, k=10):
    # every item scored by teacher forcing: [(item_key, score)], best first
    input_ids, mask = encoder_input(history)
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    n = len(tokens)
    start = torch.full((n, 1), layout["decoder_start"])
    logits = model(encoder_outputs=(hidden.expand(n, -1, -1),), attention_mask=mask.expand(n, -1),
                   decoder_input_ids=torch.cat([start, tokens[:, :-1]], dim=1)).logits
    scores = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)  # (N,)
    top = scores.topk(k)
    return [(keys[i], s) for i, s in zip(top.indices.tolist(), top.values.tolist())]


allowed = {}  # prefix of token ids -> the tokens that may follow it
for item in tokens.tolist():
    for level in range(len(item)):
        allowed.setdefault(tuple(item[:level]), set()).add(item[level])
allowed = {prefix: sorted(nxt) for prefix, nxt in allowed.items()}


@torch.no_grad()
def recommend_beam(history, k=10, beam=20):
    # constrained beam search with generate: [(item_key, score)], best first
    input_ids, mask = encoder_input(history)
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, num_beams=beam, num_return_sequences=min(k, beam),
        max_new_tokens=layout["levels"], min_new_tokens=layout["levels"], length_penalty=0.0,
        do_sample=False, output_scores=True, return_dict_in_generate=True,
        prefix_allowed_tokens_fn=lambda b, sent: allowed.get(tuple(sent.tolist()[1:]), [layout["eos"]]),
    )
    found = [item_of.get(tuple(seq[1:1 + layout["levels"]].tolist())) for seq in out.sequences]
    return [(keys[i], s) for i, s in zip(found, out.sequences_scores.tolist()) if i is not None]


print(recommend_exact([keys[0], keys[1]], k=5))
```
"""
