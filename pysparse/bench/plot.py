"""PNG of speedup over dense vs sparsity: one panel per shape x batch size (or model x batch), one line per block
size for pysparse (solid), torch's sparse path (dashed) and DeepSparse (dash-dotted, with --compare deepsparse), and
the ideal 1 / density."""
from __future__ import annotations

import math
import textwrap

from .environment import describe


def _panels(rows: list[dict]) -> dict[str, list[dict]]:
    panels: dict[str, list[dict]] = {}
    for row in rows:
        title = (f"{row['shape']} (N x K), M={row['m']}" if row["mode"] == "layer"
                 else f"{row['model']}, batch {row['batch']}")
        panels.setdefault(title, []).append(row)
    return panels


def plot_speedup(path, rows: list[dict], env: dict) -> None:
    """Write the PNG to ``path`` (needs matplotlib: the ``bench`` extra)."""
    # The object-oriented API only: no pyplot, so no global backend or figure state is touched.
    from matplotlib.figure import Figure

    panels = _panels(rows)
    # One column per batch size (so each row of panels is one shape or model), at most 4 wide.
    ncols = min(4, len({r["m"] if r["mode"] == "layer" else r["batch"] for r in rows}))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.0 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    colors = {b: f"C{i % 10}" for i, b in enumerate(blocks)}
    sparsities = sorted({r["sparsity"] for r in rows})
    lo, hi = sparsities[0], sparsities[-1]
    for ax, (title, panel) in zip(axes, panels.items()):
        grid = [lo + (hi - lo) * i / 100 for i in range(101)] if hi > lo else [lo]
        ax.plot(grid, [1 / (1 - s) for s in grid], ":", color="black", label="ideal 1 / density")
        ax.axhline(1.0, color="gray", linewidth=0.8, label="dense PyTorch")
        for block in blocks:
            for key, style, name in (("ratio_vs_dense", "-o", "pysparse"),
                                     ("torch_sparse_ratio_vs_dense", "--x", "torch sparse_bsr"),
                                     ("deepsparse_ratio_vs_dense", "-.s", "DeepSparse")):
                pts = sorted((r["sparsity"], r[key]) for r in panel if r["block"] == block and r.get(key))
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[block], label=f"{name} {block}",
                            linewidth=2.0 if name == "pysparse" else 1.0, markersize=5)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter("{x:g}x")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block sparsity (fraction of blocks dropped)")
        ax.set_ylabel("speedup over dense (same run)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    head = f"pysparse bench, {rows[0]['dtype']} on {rows[0]['device']}: {describe(env)}"
    fig.suptitle(textwrap.fill(head, width=60 * ncols), fontsize=9)
    fig.savefig(path, dpi=110)
