"""MARS's plots: the fitted laws against the probes (log-log), and the candidates' predicted
loss (matplotlib, PNG files only)."""

from __future__ import annotations

import os

import numpy as np

from megalora.atomic import atomic_savefig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def laws(fits, records, out: str) -> str:
    """Three panels: vision and LLM convergence time vs rank (one line per data size), and
    the reducible loss L - E vs the LLM rank (one line per vision rank and data size)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    sizes = sorted({r["samples"] for r in records})
    for ax, group, rank, law in ((axes[0], "vision", "r_v", fits.vision),
                                 (axes[1], "llm", "r_l", fits.llm)):
        for i, d in enumerate(sizes):
            color = f"C{i}"
            pts = [(r[rank], r[f"t_{group}"]) for r in records
                   if r["samples"] == d and r[f"t_{group}"] is not None]
            if pts:
                ax.scatter(*zip(*pts), color=color)
            if law is not None:
                grid = np.geomspace(min(r[rank] for r in records),
                                    max(r[rank] for r in records), 50)
                ax.plot(grid, law.predict(grid, d), color=color, label=f"D={d}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{group} rank")
        ax.set_ylabel("convergence step")
        ax.set_title(f"{group}: not fitted" if law is None else
                     f"{group}: t = {law.k:.3g} r^{law.gamma:.3g} D^{law.delta:.3g} "
                     f"(R^2 {law.quality.r2:.2f})")
        if law is not None:
            ax.legend(fontsize=7)
    p = fits.performance
    ax = axes[2]
    for i, (rv, d) in enumerate(sorted({(r["r_v"], r["samples"]) for r in records})):
        pts = sorted((r["r_l"], r["loss"] - p.E) for r in records
                     if r["r_v"] == rv and r["samples"] == d)
        ax.scatter(*zip(*[(x, max(y, 1e-6)) for x, y in pts]), color=f"C{i % 10}")
        grid = np.geomspace(min(x for x, _ in pts), max(x for x, _ in pts), 50)
        ax.plot(grid, p.predict(rv, grid, d) - p.E, color=f"C{i % 10}",
                label=f"r_v={rv}, D={d}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LLM rank")
    ax.set_ylabel("held-out loss - E")
    ax.set_title(f"L = {p.A:.3g}/(r_v^{p.a_v:.3g} r_l^{p.a_l:.3g} D^{p.b:.3g}) + {p.E:.3g}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_savefig(fig, out, dpi=100)
    plt.close(fig)
    return out


def candidates(cands, choice, out: str) -> str:
    """Predicted loss of each candidate (balanced, or every menu pair when the balance was not
    used); over-budget ones hatched, the choice red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"({c.r_v},{c.r_l})" for c in cands]
    if len(cands) > 12:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    colors = ["C3" if (c.r_v, c.r_l) == tuple(choice) else "C0" for c in cands]
    bars = ax.bar(labels, [c.predicted_loss for c in cands], color=colors)
    for bar, c in zip(bars, cands):
        if not c.within_budget:
            bar.set_hatch("//")
            bar.set_alpha(0.5)
    ax.set_xlabel("(vision rank, LLM rank); hatched: over the parameter budget")
    ax.set_ylabel("predicted held-out loss at full data")
    if cands:
        lo = min(c.predicted_loss for c in cands)
        hi = max(c.predicted_loss for c in cands)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    balanced = any(np.isfinite(c.r_v_balanced) for c in cands)
    ax.set_title("MARS candidates (balanced vision rank per LLM rank)" if balanced else
                 "MARS candidates (every menu pair: convergence laws not trusted)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_savefig(fig, out, dpi=100)
    plt.close(fig)
    return out
