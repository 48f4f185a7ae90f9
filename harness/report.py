"""Pictures and tables people look at: LR curves per layer group, summaries."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def lr_figure(result, title: str = "") -> plt.Figure:
    """LR of every layer group (log scale) and momentum per step, stage boundaries dashed."""
    fig, (ax_lr, ax_mom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1]})
    steps = range(len(result.lrs))
    for g, name in enumerate(result.group_names):
        ax_lr.plot(steps, [row[g] for row in result.lrs], label=name)
    ax_mom.plot(steps, result.moms, color="gray")
    for i, s in enumerate(result.stage_starts):
        for ax in (ax_lr, ax_mom):
            ax.axvline(s, color="black", linestyle="--", linewidth=0.8)
        ax_lr.annotate(f"stage {i + 1}", (s, 1), xycoords=("data", "axes fraction"),
                       xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(title="layer group")
    ax_lr.set_title(title or "One-cycle schedule per layer group")
    ax_mom.set_ylabel("momentum (beta1)")
    ax_mom.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def summary_table(result) -> str:
    """A plain-text table of per-epoch numbers and the final test accuracy."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [f"{'epoch':>5} {'stage':>5} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} {'secs':>6}"]
    for e in result.epochs:
        rows.append(f"{e.epoch:>5} {e.stage + 1:>5} {e.train_loss:>10.4f} {fmt(e.val_loss):>9} "
                    f"{fmt(e.val_accuracy):>8} {e.seconds:>6.1f}")
    rows.append(f"status: {result.status}   test accuracy: {fmt(result.test_accuracy)}   "
                f"time: {result.seconds:.1f}s")
    return "\n".join(rows)
