"""A frontier's results: the Pareto front of quality against measured speedup, the chosen point, and the table,
JSON and PNG that show them."""
from __future__ import annotations

import json
import math

from .._text_table import left_aligned

__all__ = ["pareto_front", "choose", "format_table", "write_json", "plot_frontier", "POINT_KEYS"]

# Every point carries these keys (JSON schema of benchmarks/results/frontier_*.json)
POINT_KEYS = ("pattern", "block_size", "sparsity", "criterion", "steps", "minutes", "cosine", "top1", "speedup",
              "speedup_same_options")


def _better_or_equal(a: dict, b: dict, quality: str) -> bool:
    return a[quality] >= b[quality] and a["speedup"] >= b["speedup"]


def pareto_front(points: list[dict], quality: str = "cosine") -> list[int]:
    """Indices of the points no other point beats on both ``quality`` and speedup, fastest first."""
    front = [i for i, p in enumerate(points)
             if not any(_better_or_equal(q, p, quality) and (q[quality], q["speedup"]) != (p[quality], p["speedup"])
                        for q in points)]
    return sorted(front, key=lambda i: -points[i]["speedup"])


def choose(points: list[dict], *, quality: float | None, agreement: float | None) -> int | None:
    """Index of the fastest point whose mean cosine >= ``quality`` and nearest-neighbour agreement >= ``agreement``
    (digits: accuracy in ``cosine``'s place; ``top1`` is absent there), or None."""
    if quality is None and agreement is None:
        return None
    ok = [i for i, p in enumerate(points)
          if (quality is None or p["cosine"] >= quality)
          and (agreement is None or p.get("top1") is None or p["top1"] >= agreement)]
    return max(ok, key=lambda i: points[i]["speedup"], default=None)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(points: list[dict], *, quality_name: str, chosen: int | None, front: list[int]) -> str:
    """One row a point; ``*`` marks the Pareto front, ``>`` the chosen point."""
    header = ("", "pattern", "sparsity", "criterion", "steps", "min", quality_name, "top1", "speedup",
              "same opts")
    rows = []
    for i, p in enumerate(points):
        mark = ">" if i == chosen else "*" if i in front else ""
        rows.append((mark, p["pattern"], f"{p['sparsity']:.2f}", p["criterion"], str(p["steps"]),
                     _fmt(p["minutes"], ".1f"), _fmt(p["cosine"], ".3f"), _fmt(p.get("top1"), ".3f"),
                     _fmt(p["speedup"], ".2f") + "x", _fmt(p.get("speedup_same_options"), ".2f") + "x"))
    return "\n".join(left_aligned(header, rows))


def write_json(path, *, machine: dict, points: list[dict], chosen: int | None, options: dict, dense: dict) -> None:
    """``dense``: the dense model's own quality on the same held-out data (digits: its accuracy)."""
    with open(path, "w") as f:
        json.dump({"machine": machine, "options": options, "dense": dense, "points": points, "chosen": chosen}, f,
                  indent=1)


def plot_frontier(path, points: list[dict], *, quality_name: str, title: str, chosen: int | None) -> None:
    """Quality against speedup, one colour a pattern, the Pareto front as a line. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p["pattern"] for p in points):
        mine = [p for p in points if p["pattern"] == name]
        ax.scatter([p["speedup"] for p in mine], [p["cosine"] for p in mine], label=name, s=30)
        for p in mine:
            ax.annotate(f"{p['sparsity']:.0%}", (p["speedup"], p["cosine"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto_front(points)
    ax.plot([points[i]["speedup"] for i in front], [points[i]["cosine"] for i in front], "k--", lw=1,
            label="Pareto front")
    if chosen is not None:
        ax.scatter([points[chosen]["speedup"]], [points[chosen]["cosine"]], s=160, facecolors="none",
                   edgecolors="red", label="chosen")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("end-to-end speedup over the stock dense model (same process)")
    ax.set_ylabel(quality_name)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
