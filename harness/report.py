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


def optuna_figures(ostudy) -> list[tuple[str, plt.Figure]]:
    """Optuna's optimisation history, parameter importances and parallel coordinates, as
    matplotlib figures; a plot that needs more completed trials than exist is left out."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in ostudy.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    wanted = [("optimization_history", ovm.plot_optimization_history, 1),
              ("param_importances", ovm.plot_param_importances, 2),
              ("parallel_coordinate", ovm.plot_parallel_coordinate, 2)]
    out = []
    for name, plot, needed in wanted:
        if len(complete) < needed or (name != "optimization_history" and not complete[0].params):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(ostudy)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. importances when every completed trial has the same params
        ax = ax.flat[0] if hasattr(ax, "flat") else ax
        fig = ax.get_figure()
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        out.append((name, fig))
    return out


def compare_figure(cmp) -> plt.Figure:
    """Test accuracy per strategy (every seed a dot, mean and 95% interval) above the LR
    curves of each strategy's best recipe."""
    n = len(cmp.rows)
    fig = plt.figure(figsize=(max(8, 3.2 * n), 7.5))
    grid = fig.add_gridspec(2, n, height_ratios=[1.2, 1])
    ax = fig.add_subplot(grid[0, :])
    for i, r in enumerate(cmp.rows):
        lo, hi = r.ci95()
        ax.errorbar([i], [r.mean], yerr=[[r.mean - lo], [hi - r.mean]], fmt="s", color="black",
                    capsize=6, zorder=3)
        jitter = [i + 0.08 * (k - (len(r.test) - 1) / 2) for k in range(len(r.test))]
        ax.scatter(jitter, r.test, alpha=0.7, zorder=2, label=None)
    ax.set_xticks(range(n), [r.strategy for r in cmp.rows])
    ax.set_ylabel("test accuracy")
    ax.set_title(cmp.verdict(), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    for i, r in enumerate(cmp.rows):
        sub = fig.add_subplot(grid[1, i])
        res = r.lr_result
        for g, name in enumerate(res.group_names):
            sub.plot([row[g] for row in res.lrs], label=name)
        for s in res.stage_starts[1:]:
            sub.axvline(s, color="black", linestyle="--", linewidth=0.8)
        sub.set_yscale("log")
        sub.set_title(f"{r.strategy}: best recipe LRs", fontsize=9)
        sub.set_xlabel("step")
        if i == 0:
            sub.set_ylabel("learning rate")
            sub.legend(fontsize=7)
    fig.tight_layout()
    return fig


def groups_table(model) -> str:
    """Each layer group's name, parameter count and modules, input -> output, the way timm
    dumps a group assignment."""
    from harness.engine.groups import describe_groups
    rows = describe_groups(model)
    total = sum(r["parameters"] for r in rows)
    width = max(len(r["group"]) for r in rows + [{"group": "group"}])
    lines = [f"{model.arch}: {len(rows)} layer groups, {total:,} parameters",
             f"{'group':<{width}}  {'parameters':>12}  modules"]
    for r in rows:
        lines.append(f"{r['group']:<{width}}  {r['parameters']:>12,}  {' | '.join(r['modules'])}")
    return "\n".join(lines)


SUGGESTION_COLORS = {"valley": "C1", "steep": "C2", "minimum": "C3"}


def lr_find_panel(ax, result, title: str = "") -> None:
    """One LR-finder curve on `ax`: smoothed loss against LR (log x), the last 5 points left
    out as fastai's plot does (when more than 10 were recorded), each suggestion a labelled point."""
    from harness.engine.lr_find import SKIP_END, SUGGESTION_NAMES

    n = len(result.lrs)
    keep = n - SKIP_END if n > 2 * SKIP_END else n
    ax.plot(result.lrs[:keep], result.losses[:keep], color="C0")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    for name in SUGGESTION_NAMES:
        if name not in result.points:
            continue
        x, y = result.points[name]
        value = result.suggestions[name]
        label = (f"minimum: {value:.2e} (lowest loss at {x:.2e})" if name == "minimum"
                 else f"{name}: {value:.2e}")
        ax.plot([x], [y], "o", color=SUGGESTION_COLORS[name], label=label, zorder=3)
    if result.points:
        ax.legend(loc="best")
    suffix = ", stopped early: the loss diverged" if result.stopped_early else ""
    ax.set_title(title or f"LR finder: {n} steps{suffix}")


def lr_find_figure(result, title: str = "") -> plt.Figure:
    """One stage's LR-finder curve, its suggestions labelled points on it."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lr_find_panel(ax, result, title)
    fig.tight_layout()
    return fig


def lr_find_stages_figure(results) -> plt.Figure:
    """Every stage's LR-finder curve side by side on one LR axis, its valley a dotted line
    across all panels: where the unfrozen model wants its LR against the head-only stage."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), sharex=True, squeeze=False)
    for ax, r in zip(axes[0], results):
        early = ", stopped early" if r.stopped_early else ""
        lr_find_panel(ax, r, f"stage {r.stage}: trains {r.train} ({len(r.lrs)} steps{early})")
        for other in results:
            if "valley" in other.suggestions:
                ax.axvline(other.suggestions["valley"], color=SUGGESTION_COLORS["valley"],
                           linestyle=":" if other is not r else "-", linewidth=0.8, alpha=0.7)
    valleys = ", ".join(f"stage {r.stage} {r.suggestions['valley']:.2e}" for r in results if "valley" in r.suggestions)
    fig.suptitle(f"LR finder on every stage, from the model as the stages before left it; valley: {valleys}",
                 fontsize=10)
    fig.tight_layout()
    return fig
