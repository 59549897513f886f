"""A picture of a cell: inputs c_{k-2} and c_{k-1}, intermediate nodes, the concatenated output c_{k},
and every edge labelled by its operation (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from ..models.genotype import Genotype


def draw_cell(genotype: Genotype, kind: str, path: str | Path) -> Path:
    """Draw the `kind` ("normal" or "reduce") cell of `genotype` to a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    edges = genotype.edges(kind)
    steps = genotype.steps(kind)
    concat = list(getattr(genotype, f"{kind}_concat"))
    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for n in range(steps):
        pos[2 + n] = (1.5 + 1.4 * n, 1.2 * (1 if n % 2 == 0 else -1) * (0.6 + 0.2 * (n // 2)))
    out_xy = (1.5 + 1.4 * steps + 0.6, 0.0)
    fig, ax = plt.subplots(figsize=(2.2 + 1.5 * steps, 4.2))
    seen: dict[tuple[int, int], int] = {}
    for op, j, i in edges:
        (x0, y0), (x1, y1) = pos[j], pos[i]
        k = seen.get((j, i), 0)  # parallel edges (two operations on one pair of nodes) bend apart
        seen[(j, i)] = k + 1
        rad = 0.35 * k * (1 if k % 2 else -1)
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "->", "color": "0.35", "shrinkA": 14, "shrinkB": 14,
                                "connectionstyle": f"arc3,rad={rad}"})
        # the arc's midpoint lies rad/2 of the chord's length off the chord, to its right
        mx, my = (x0 + x1) / 2 + rad / 2 * (y1 - y0), (y0 + y1) / 2 - rad / 2 * (x1 - x0)
        ax.text(mx, my, op, fontsize=7, ha="center", va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    for i in concat:
        ax.annotate("", xy=out_xy, xytext=pos[i],
                    arrowprops={"arrowstyle": "->", "color": "0.7", "linestyle": "--", "shrinkA": 14, "shrinkB": 16})
    labels = {0: "c_{k-2}", 1: "c_{k-1}"}
    for n, (x, y) in pos.items():
        colour = "#9ecae1" if n < 2 else "#fdd49e"
        ax.text(x, y, labels.get(n, str(n - 2)), ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": colour, "ec": "0.3"})
    ax.text(*out_xy, "c_{k}", ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.4", "fc": "#c7e9c0", "ec": "0.3"})
    ax.set_title(f"{kind} cell ({len(edges)} edges)", fontsize=10)
    ax.set_xlim(-0.6, out_xy[0] + 0.6)
    ax.set_ylim(-2.2, 2.2)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
