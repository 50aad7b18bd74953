"""The forward passes of one continuous-batching engine step: decode rows batched, each prefill chunk alone.

A step holds rows of two shapes: decodes (one new token on a cached context) and prefill chunks (many new
tokens). Padding them into one batch pads every decode row to the longest chunk, so a 64-token prompt
joining 16 decodes cost about as much as 17 prompts. ``forward_split`` runs what a serving engine pays
for instead: the one-token rows as one batched pass (their matrix products batched, each row's attention
reading its own cache), and each longer chunk as its own pass on its own cache, written in place (no copy).
The padded pass over every row (``forward_padded``, the engine's first design) is kept only for the
benchmark that compares the two (``benchmarks/bench_engine_continuous.py``) and the test that checks they
agree.

Caches are per request, one ``(1, heads, slots, head_dim)`` tensor per layer for keys and for values,
preallocated for the request's prompt plus output, so a row's new keys and values are appended in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch.nn import functional as F

from capsim.core.engine import ReferenceTransformer, _Block


@dataclass
class Row:
    """One scheduled row: its new tokens, how many tokens of it are cached, and its own KV cache."""

    new: list[int]  # the tokens this step computes
    context: int  # tokens already in the cache (the new ones start at this position)
    k: list[torch.Tensor]  # per layer, (1, heads, slots, head_dim)
    v: list[torch.Tensor]


def _greedy(model: ReferenceTransformer, last: torch.Tensor) -> list[int]:
    """The greedy next token of each row of ``last`` (rows, d_model), the final hidden states."""
    nxt = torch.argmax(model.ln_f(last) @ model.tok.weight.T, -1).tolist()
    return [int(t) for t in nxt]


def forward_padded(model: ReferenceTransformer, rows: list[Row]) -> list[int]:
    """One padded pass over ``rows``: contexts copied in right-aligned to a common slot, new tokens padded
    to the longest; the new keys and values copied back. The greedy next token at each row's last token."""
    dev = rows[0].k[0].device
    n_rows = len(rows)
    counts = [len(r.new) for r in rows]
    ctx = max(r.context for r in rows)  # new tokens start at this slot in every row
    t = max(counts)
    slots = ctx + t
    tokens = torch.zeros(n_rows, t, dtype=torch.long)
    positions = torch.zeros(n_rows, t, dtype=torch.long)
    keep = torch.zeros(n_rows, t, slots, dtype=torch.bool)  # query i of a row may see slot s
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for j, r in enumerate(rows):
        n, c = counts[j], r.context
        tokens[j, :n] = torch.tensor(r.new)
        positions[j, :n] = torch.arange(c, c + n)
        keep[j, :, ctx - c : ctx] = True
        keep[j, :, ctx:] = causal
        keep[j, n:, :] = False
        keep[j, torch.arange(n, t), ctx + torch.arange(n, t)] = True  # padding queries see themselves
    n_layers = len(model.blocks)
    _, heads, _, head_dim = rows[0].k[0].shape
    like = rows[0].k[0]
    k_all = [like.new_zeros(n_rows, heads, slots, head_dim) for _ in range(n_layers)]
    v_all = [like.new_zeros(n_rows, heads, slots, head_dim) for _ in range(n_layers)]
    for j, r in enumerate(rows):
        c = r.context
        if c:
            for layer in range(n_layers):
                k_all[layer][j, :, ctx - c : ctx] = r.k[layer][0, :, :c]
                v_all[layer][j, :, ctx - c : ctx] = r.v[layer][0, :, :c]
    tokens, positions, mask = tokens.to(dev), positions.to(dev), keep.to(dev)[:, None]
    x = model.tok(tokens) + model.pos(positions)
    for layer, block in enumerate(model.blocks):
        x = block(x, k_all[layer], v_all[layer], ctx, mask)
    last = torch.tensor([n - 1 for n in counts], device=dev)
    nxt = _greedy(model, x[torch.arange(n_rows, device=dev), last])
    for j, r in enumerate(rows):  # the new keys and values go back into each row's own cache
        n, c = counts[j], r.context
        for layer in range(n_layers):
            r.k[layer][0, :, c : c + n] = k_all[layer][j, :, ctx : ctx + n]
            r.v[layer][0, :, c : c + n] = v_all[layer][j, :, ctx : ctx + n]
    return nxt


def forward_alone(model: ReferenceTransformer, row: Row) -> int:
    """One row's pass on its own cache, in place: its new keys and values land in their slots directly."""
    dev = row.k[0].device
    n, c = len(row.new), row.context
    tokens = torch.tensor([row.new], device=dev)
    positions = torch.arange(c, c + n, device=dev)[None]
    # token i sees the context and the new tokens up to itself
    mask = torch.ones(n, c + n, dtype=torch.bool, device=dev).tril(c)[None, None]
    x = model.tok(tokens) + model.pos(positions)
    for layer, block in enumerate(model.blocks):
        x = block(x, row.k[layer], row.v[layer], c, mask)
    return _greedy(model, x[:, -1])[0]


def forward_decodes(model: ReferenceTransformer, rows: list[Row]) -> list[int]:
    """One batched pass over one-token rows: the layers' matrix products run on the whole batch; each row's
    new key and value are written into its own cache, and its attention reads that cache in place.

    Attention runs row by row because the contexts differ in length: gathering them into a padded batch
    copies every context every step, which on the CPU cost more than the per-row calls it saves (16 rows at
    context 200, tiny: 4.8 ms padded against 3.6 ms per row). On a GPU a varlen/paged attention kernel
    would do both at once; the reference model has none.
    """
    dev = rows[0].k[0].device
    b = len(rows)
    tokens = torch.tensor([r.new for r in rows], device=dev)
    positions = torch.tensor([[r.context] for r in rows], device=dev)
    x = model.tok(tokens) + model.pos(positions)
    d = x.shape[2]
    for layer, module in enumerate(model.blocks):
        blk = cast(_Block, module)
        shape = (b, 1, blk.n_heads, blk.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in blk.qkv(blk.ln1(x)).split(d, dim=2))
        att = []
        for j, r in enumerate(rows):
            c = r.context
            kc, vc = r.k[layer], r.v[layer]
            kc[0, :, c] = k[j, :, 0]
            vc[0, :, c] = v[j, :, 0]
            # one query that sees its whole context and itself: no mask
            att.append(F.scaled_dot_product_attention(q[j : j + 1], kc[:, :, : c + 1], vc[:, :, : c + 1]))
        x = x + blk.proj(torch.cat(att).transpose(1, 2).reshape(b, 1, d))
        x = x + blk.fc2(F.gelu(blk.fc1(blk.ln2(x))))
    return _greedy(model, x[:, -1])


def forward_split(model: ReferenceTransformer, rows: list[Row]) -> list[int]:
    """The step as a serving engine runs it: the one-token rows in one batched pass (``forward_decodes``),
    each longer chunk alone on its own cache. The greedy next token of each row, in order."""
    out: list[int] = [0] * len(rows)
    decodes = [j for j, r in enumerate(rows) if len(r.new) == 1]
    if decodes:
        for j, tok in zip(decodes, forward_decodes(model, [rows[j] for j in decodes]), strict=True):
            out[j] = tok
    for j, r in enumerate(rows):
        if len(r.new) > 1:
            out[j] = forward_alone(model, r)
    return out
