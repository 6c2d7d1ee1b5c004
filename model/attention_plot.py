"""Attention inspection: where each head of a layer looks.

Every attention head turns a row of scores into weights that sum to 1 (model/attention.py):
row i of a head's (T, T) map says how much token i takes from each earlier token j.
Plotting all heads of a layer side by side shows their different jobs: one head looks
at the previous character, another at the start of the word, another spreads evenly.

    maps = attention_maps(model, ids, layer=0)   # (n_head, T, T) host array
    plot_attention(maps, "attn.png", labels=list(text))   # needs matplotlib
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from tinygrad_lite import Tensor, backend, no_grad


def attention_maps(model: Any, ids: Sequence[int], layer: int) -> Any:
    """The attention weights of every head of block `layer` (negative counts from the
    end) for one sequence: ids (T,) -> host array (n_head, T, T), each row summing to 1
    and zero above the diagonal (causal). Sequences longer than block_size are cropped
    to their last block_size tokens."""
    n_layer = len(model.h)
    if not -n_layer <= layer < n_layer:
        raise ValueError(f"layer must be in 0..{n_layer - 1} (or negative, from the end), got {layer}")
    ids = [int(t) for t in ids][-model.config.block_size:]
    if not ids:
        raise ValueError("attention_maps needs at least one token")
    attn = model.h[layer].attn
    model.eval()
    # keep_weights routes the layer through the step-by-step `self_attention`, which
    # returns its weights; the fused kernel used for training never materialises them
    attn.keep_weights = True
    try:
        with no_grad():
            model(Tensor([ids], dtype="int64", device=model.wte.weight.device))
        weights = attn.last_weights  # (1, n_head, T, T)
    finally:
        attn.keep_weights, attn.last_weights = False, None
    return backend.to_numpy(weights.data[0])


def plot_attention(maps: Any, path: str | Path, labels: Sequence[str] | None = None,
                   title: str | None = None) -> bool:
    """Draw every head's map (n_head, T, T) in one PNG; False (nothing written) when
    matplotlib is not installed. `labels` (T,) name the tokens on the axes when short."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n_head, T = maps.shape[0], maps.shape[-1]
    cols = min(n_head, 4)
    rows = math.ceil(n_head / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n_head:
            ax.axis("off")
            continue
        ax.imshow(maps[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        if labels is not None and T <= 40:  # beyond that the tick labels overlap
            shown = [repr(s)[1:-1].replace(" ", "\u2423") for s in labels]  # '\n' as \n, ' ' as a visible blank
            ax.set_xticks(range(T), shown, fontsize=6, rotation=90)
            ax.set_yticks(range(T), shown, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.supxlabel("key (attended to)")
    fig.supylabel("query (attending)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
