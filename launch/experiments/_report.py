"""Shared by the experiment scripts: per-variant statistics over seeds (means with 95 %
Student-t intervals, paired differences against a reference variant), written as JSON,
markdown and PNG plots. Metrics are data (``METRICS``), not code per column."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import stats

from megalora.atomic import atomic_savefig, atomic_write_bytes

METRICS: List[Tuple[str, str, str]] = [
    # (key in a run's merged record, column title, which way is better)
    ("image_mse", "image MSE", "lower"),
    ("text_ce", "text CE", "lower"),
    ("caption_ce", "caption CE", "lower"),
    ("choice_caption_to_image", "caption→image choice", "higher"),
    ("choice_image_to_caption", "image→caption choice", "higher"),
    ("judge.category_accuracy", "judge category", "higher"),
    ("judge.retrieval_top1", "judge retrieval top-1", "higher"),
    ("judge.frechet", "judge Fréchet", "lower"),
    ("step_cpu_seconds", "CPU s/step", "lower"),
]
"""EmojiCap's per-run figures (megalora.umm.emojicap_metrics and the trainer's timing)."""
LOSSES: List[Tuple[str, str, str]] = [
    ("image", "held-out image loss", "lower"),
    ("text", "held-out text loss", "lower"),
    ("step_cpu_seconds", "CPU s/step", "lower"),
]
"""The trainer's own held-out losses and timing (the synthetic toy's experiments)."""


def lookup(record: dict, key: str) -> float:
    for part in key.split("."):
        record = record[part]
    return float(record)


def interval(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval; nan for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1)
                                  / np.sqrt(len(x)))


def summarise(records: Dict[str, dict], variants: Sequence[str], seeds: Sequence[int],
              reference: str, metrics=METRICS) -> Dict[str, Dict[str, dict]]:
    """variant -> metric -> {values, mean, ci, diff, diff_ci, rel (diff / reference mean)}."""
    out = {}
    for name in variants:
        out[name] = {}
        for key, _, _ in metrics:
            values = [lookup(records[f"{name}_s{s}"], key) for s in seeds]
            ref = [lookup(records[f"{reference}_s{s}"], key) for s in seeds]
            mean, ci = interval(values)
            diff, diff_ci = interval([a - b for a, b in zip(values, ref)])
            scale = float(np.mean(ref))
            out[name][key] = {"values": values, "mean": mean, "ci": ci, "diff": diff,
                              "diff_ci": diff_ci,
                              "rel": diff / scale if scale else float("nan")}
    return out


def _cell(m: dict, paired: bool) -> str:
    text = f"{m['mean']:.4f} ± {m['ci']:.4f}"
    if paired:
        lo, hi = m["diff"] - m["diff_ci"], m["diff"] + m["diff_ci"]
        sign = "**" if lo > 0 or hi < 0 else ""  # the paired interval excludes zero
        text += f"<br>{sign}{100 * m['rel']:+.1f} % [{lo:+.4f}, {hi:+.4f}]{sign}"
    return text


def markdown(summary: dict, reference: str, seeds: Sequence[int], title: str,
             metrics=METRICS) -> str:
    lines = [f"## {title}", "",
             f"Mean ± 95 % t-interval over seeds {list(seeds)}; under it, the paired difference "
             f"against `{reference}` (same seed: same init and data order) as a percentage of "
             f"its mean and the difference's 95 % interval (**bold**: it excludes zero).", "",
             "| variant | " + " | ".join(t for _, t, _ in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, row in summary.items():
        cells = [_cell(row[k], name != reference) for k, _, _ in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    better = ", ".join(f"{t}: {w}" for _, t, w in metrics)
    return "\n".join(lines + ["", f"Better: {better}.", ""])


def plot_differences(summary: dict, reference: str, keys: Sequence[str], path: str,
                     metrics=METRICS) -> None:
    """One panel per metric: each variant's paired difference against the reference with its
    95 % interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [n for n in summary if n != reference]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.5 * len(names) + 1.5),
                             squeeze=False)
    titles = {k: t for k, t, _ in metrics}
    for ax, key in zip(axes[0], keys):
        d = [summary[n][key]["diff"] for n in names]
        e = [summary[n][key]["diff_ci"] for n in names]
        ax.errorbar(d, range(len(names)), xerr=e, fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"{titles[key]} − {reference}")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # long decimals must not collide
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_text(path: str, text: str) -> None:
    """``text`` to ``path`` atomically: an interrupted run leaves the old report or the new one,
    never half a table."""
    atomic_write_bytes(path, text.encode())


def provenance(command: str) -> dict:
    """Where and when: the command, commit (and whether the tree was dirty), machine."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    import torch
    return {"command": command, "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                               time.gmtime())}


def provenance_line(info: dict) -> str:
    """``provenance``'s record as the line that ends a results file."""
    return (f"`{info['command']}` at commit {info['commit']}"
            f"{' (uncommitted changes)' if info['dirty'] else ''}; {info['machine']}; torch "
            f"{info['torch']}; {info['date']}.")


def write_report(out: str, variants, seeds, trained: dict, scored: dict, reference: str,
                 title: str, command: str, plot_keys=("image_mse", "text_ce"),
                 metrics=METRICS) -> dict:
    """results.json (every run and the summary), results.md and differences.png in ``out``;
    ``metrics``: the columns, (key in a run's merged record, title, better)."""
    records = {k: {**trained[k], **scored.get(k, {})} for k in trained}
    summary = summarise(records, list(variants), seeds, reference, metrics)
    info = provenance(command)
    write_text(os.path.join(out, "results.json"),
               json.dumps({"provenance": info, "seeds": list(seeds), "runs": records,
                           "summary": summary}, indent=1))
    text = markdown(summary, reference, seeds, title, metrics)
    text += f"\n{provenance_line(info)}\n"
    write_text(os.path.join(out, "results.md"), text)
    plot_differences(summary, reference, plot_keys, os.path.join(out, "differences.png"),
                     metrics)
    print(text)
    return summary
