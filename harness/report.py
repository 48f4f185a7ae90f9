"""Pictures and tables people look at: LR curves per layer group, summaries.

The pictures are matplotlib Figure objects, made without pyplot: they need no backend (a
file, an MLflow artifact, or a notebook's inline display alike) and no closing. Only
Optuna's own plots (`optuna_figures`) go through pyplot. The CLI picks the Agg backend for
its commands (harness/cli.py); importing this module changes nothing.
"""
from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure


FROZEN_STYLE = {"linestyle": ":", "color": "0.45", "linewidth": 1.2, "zorder": 3}   # a frozen group's LR, drawn over a training one it may coincide with
FROZEN_LABEL = "frozen (LR not applied)"
FROZEN_SPAN = "0.93"     # the band behind the steps where some group is frozen
FROZEN_SPAN_LABEL = "steps with a frozen group"


def stage_trainable(trainable, n_groups: int) -> list[tuple[int, ...]] | None:
    """Which groups (0-based, the head last) train in each stage: from a Recipe (its stages'
    `trained_groups`), a list of stages, a list of counts (the last N groups) or of group
    tuples; None stays None."""
    if trainable is None:
        return None
    stages = getattr(trainable, "stages", trainable)
    return [tuple(range(n_groups - s, n_groups)) if isinstance(s, int) else
            tuple(s) if isinstance(s, (tuple, list)) else s.trained_groups(n_groups) for s in stages]


def frozen_mask(result, trainable) -> list[list[bool]] | None:
    """[group][step]: True where the group is frozen at that step (None: not known)."""
    n_groups, n_steps = len(result.group_names), len(result.lrs)
    trained = stage_trainable(trainable, n_groups)
    if trained is None:
        return None
    starts = list(result.stage_starts) or [0]
    mask = [[False] * n_steps for _ in range(n_groups)]
    for k, start in enumerate(starts):
        if k >= len(trained):
            break
        end = starts[k + 1] if k + 1 < len(starts) else n_steps
        for g in range(n_groups):
            if g not in trained[k]:
                for t in range(start, min(end, n_steps)):
                    mask[g][t] = True
    return mask


def _runs(flags: list[bool]):
    """(start, end, flag) for every maximal run of equal flags; end exclusive."""
    start = 0
    for t in range(1, len(flags) + 1):
        if t == len(flags) or flags[t] != flags[start]:
            yield start, t, flags[start]
            start = t


def lr_panel(ax, result, trainable=None) -> bool:
    """Every layer group's LR per step (log scale) on `ax`, stage starts dashed, no legend
    (`lr_legend`). With `trainable` (a Recipe, its stages, or trainable-group counts per
    stage), the steps where a group is frozen are a thin dotted grey line: the optimizer
    holds an LR for the group, but its weights do not move, so a frozen body must not read
    as a training one. Returns whether any frozen segment was drawn."""
    mask = frozen_mask(result, trainable)
    steps = list(range(len(result.lrs)))
    any_frozen = False
    for g, name in enumerate(result.group_names):
        ys = [row[g] for row in result.lrs]
        runs = [(0, len(steps), False)] if mask is None else _runs(mask[g])
        for a, b, frozen in runs:
            if frozen:
                any_frozen = True
                ax.plot(steps[a:b], ys[a:b], **FROZEN_STYLE, label=f"_{name} (frozen)")
            else:
                ax.plot(steps[a:b], ys[a:b], color=f"C{g}", linestyle="-", linewidth=1.5, label=name)
    if mask is not None:   # a light band where part of the model is frozen: visible even
        any_group = [any(col) for col in zip(*mask)]   # when a frozen LR coincides with the head's
        for a, b, frozen in _runs(any_group):
            if frozen:
                ax.axvspan(a - 0.5, b - 0.5, color=FROZEN_SPAN, zorder=0, linewidth=0)
    for s in result.stage_starts[1:]:
        ax.axvline(s, color="black", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    return any_frozen


def never_trained(result, trainable) -> list[str]:
    """The groups frozen at every step (head_only's body)."""
    mask = frozen_mask(result, trainable)
    if mask is None or not result.lrs:
        return []
    return [name for name, m in zip(result.group_names, mask) if all(m)]


def lr_legend(ax, group_names, frozen: bool, frozen_throughout=(), **kwargs) -> None:
    """One entry per group that trains, in its colour, and one for the dotted grey of a
    frozen group when a panel drew one (naming the groups that never train)."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=f"C{g}", linestyle="-", linewidth=1.5, label=name)
               for g, name in enumerate(group_names) if name not in frozen_throughout]
    if frozen:
        label = FROZEN_LABEL + (f"\n{', '.join(frozen_throughout)}: throughout" if frozen_throughout else "")
        handles.append(Line2D([], [], **FROZEN_STYLE, label=label))
        from matplotlib.patches import Patch
        handles.append(Patch(color=FROZEN_SPAN, label=FROZEN_SPAN_LABEL))
    ax.legend(handles=handles, title="layer group", **kwargs)


def lr_figure(result, title: str = "", trainable=None) -> Figure:
    """LR of every layer group (log scale) and momentum per step, stage boundaries dashed.
    `trainable` (a Recipe, its stages, or trainable-group counts per stage) draws the steps
    where a group is frozen as a thin dotted grey line."""
    fig = Figure(figsize=(9, 6))
    ax_lr, ax_mom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    frozen = lr_panel(ax_lr, result, trainable)
    # beside the curves, not on them: a schedule's curves cover every corner of the axes
    lr_legend(ax_lr, result.group_names, frozen, never_trained(result, trainable),
              loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=8, title_fontsize=8)
    ax_mom.plot(range(len(result.moms)), result.moms, color="gray")
    for i, s in enumerate(result.stage_starts):
        ax_mom.axvline(s, color="black", linestyle="--", linewidth=0.8)
        if i == 0:
            ax_lr.axvline(s, color="black", linestyle="--", linewidth=0.8)
        ax_lr.annotate(f"stage {i + 1}", (s, 1), xycoords=("data", "axes fraction"),
                       xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax_lr.set_ylabel("learning rate")
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


def optuna_figures(ostudy) -> list[tuple[str, Figure]]:
    """Optuna's optimisation history, parameter importances and parallel coordinates, as
    matplotlib figures; a plot that needs more completed trials than exist is left out.
    Optuna draws them with pyplot: close them (`plt.close(fig)`) when done."""
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
            # optuna's plots switch the global style to ggplot: kept inside, so the LR
            # pictures drawn after them keep the default look
            with warnings.catch_warnings(), matplotlib.rc_context():
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


def compare_figure(cmp) -> Figure:
    """Test accuracy per strategy (every seed a dot, mean and 95% interval), beside it (when
    the study names shifts) the accuracy under each shift, above the LR curves of each
    strategy's best recipe."""
    n = len(cmp.rows)
    shifts = bool(cmp.rows[0].shift)
    wise = [r for r in cmp.rows if getattr(r, "wise_ft", None) is not None]
    cols = max(n, 2) if shifts else n
    panels = len(wise[0].wise_ft.conditions) if wise else 0   # WiSE-FT's row: one panel per condition
    fig = Figure(figsize=(max(8 if not shifts else 11, 3.2 * cols, 2.9 * panels), 7.5 + (3.5 if wise else 0)))
    grid = fig.add_gridspec(3 if wise else 2, cols, height_ratios=[1.2, 1, 1] if wise else [1.2, 1])
    split = max(1, cols // 2 + cols % 2) if shifts else cols
    ax = fig.add_subplot(grid[0, :split])
    if shifts:
        shift_panel(fig.add_subplot(grid[0, split:]), cmp)
    for i, r in enumerate(cmp.rows):
        lo, hi = r.ci95()
        ax.errorbar([i], [r.mean], yerr=[[r.mean - lo], [hi - r.mean]], fmt="s", color="black",
                    capsize=6, zorder=3)
        jitter = [i + 0.08 * (k - (len(r.test) - 1) / 2) for k in range(len(r.test))]
        ax.scatter(jitter, r.test, alpha=0.7, zorder=2, label=None)
    ax.set_xticks(range(n), [r.strategy for r in cmp.rows])
    ax.set_ylabel(f"test {cmp.metric.replace('_', ' ')}")
    ax.set_title(_wrap(cmp.verdict(), 70 if shifts else 110), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    lr_panels(fig, grid, cmp.rows)
    if wise:
        wise_ft_panels(fig, grid[2, :], wise)
    fig.tight_layout()
    return fig


def wise_ft_panels(fig, spec, rows) -> list:
    """WiSE-FT's accuracy against alpha (mean over seeds), one panel per condition: the
    validation split that chooses alpha, the test split, each shift; one line per strategy."""
    conditions = rows[0].wise_ft.conditions
    titles = {"val": "WiSE-FT: val (chooses alpha)", "test": "WiSE-FT: test split"}
    grid = spec.subgridspec(1, len(conditions), wspace=0.35)
    axes = []
    for j, c in enumerate(conditions):
        ax = fig.add_subplot(grid[0, j])
        for i, r in enumerate(rows):   # the colours of the shift panel: every row has its curves
            w = r.wise_ft
            chosen = ", ".join(f"{a:g}" for a in w.chosen)
            ax.plot(w.alphas, w.mean_curve(c), marker="o", markersize=4, color=f"C{i}",
                    label=f"{r.strategy} (alpha chosen: {chosen})")
        ax.set_title(titles.get(c, c), fontsize=9)
        ax.set_xticks(rows[0].wise_ft.alphas, [f"{a:g}" for a in rows[0].wise_ft.alphas], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        axes.append(ax)
    axes[0].set_ylabel("mean accuracy", fontsize=8)
    axes[0].set_xlabel("alpha: 0 start model, 1 fine-tuned", fontsize=8)
    axes[0].legend(fontsize=6.5, loc="best")
    return axes


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def lr_panels(fig, grid, rows) -> list:
    """compare_figure's bottom row: each strategy's best-recipe LRs (seed 0) in `grid[1, i]`,
    frozen steps dotted grey (from `row.recipe`); one legend, on the first panel, naming the
    groups and the frozen style whenever any panel has a frozen segment."""
    axes, frozen, always = [], False, None
    for i, r in enumerate(rows):
        sub = fig.add_subplot(grid[1, i])
        trainable = getattr(r, "recipe", None)
        frozen |= lr_panel(sub, r.lr_result, trainable)
        mine = set(never_trained(r.lr_result, trainable))
        always = mine if always is None else always & mine   # frozen in every panel
        sub.set_title(f"{r.strategy}: best recipe LRs", fontsize=9)
        sub.set_xlabel("step")
        axes.append(sub)
    if axes:
        axes[0].set_ylabel("learning rate")
        names = rows[0].lr_result.group_names
        lr_legend(axes[0], names, frozen, [n for n in names if n in always], fontsize=7, title_fontsize=7)
    return axes


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


def lr_find_figure(result, title: str = "") -> Figure:
    """One stage's LR-finder curve, its suggestions labelled points on it."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    lr_find_panel(ax, result, title)
    fig.tight_layout()
    return fig


def lr_find_stages_figure(results) -> Figure:
    """Every stage's LR-finder curve side by side on one LR axis, its valley a dotted line
    across all panels: where the unfrozen model wants its LR against the head-only stage."""
    fig = Figure(figsize=(5 * len(results), 4.5))
    axes = fig.subplots(1, len(results), sharex=True, squeeze=False)
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


def shift_panel(ax, cmp) -> None:
    """In-distribution and shifted test accuracy per strategy: one line per strategy across
    the conditions (the test split, then each shift), each point the mean over seeds."""
    labels = list(cmp.rows[0].shift)
    conditions = ["test split", *labels]
    for i, r in enumerate(cmp.rows):   # accuracy throughout, whatever the study ranks on
        means = [r.score_mean("accuracy"), *(r.shift_mean(label) for label in labels)]
        ax.plot(range(len(conditions)), means, marker="o", color=f"C{i}", label=r.strategy)
    ax.set_xticks(range(len(conditions)), conditions, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_title("in distribution and under shift", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def confusion_figure(cm, class_names, title: str = "") -> Figure:
    """A confusion matrix: rows the true class, columns the predicted one, each cell its
    count, shaded by the row's share (the class's recall on the diagonal); the title adds
    accuracy, balanced accuracy and macro F1."""
    import numpy as np

    from harness.engine.metrics import scores
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    k = len(class_names)
    fig = Figure(figsize=(max(4.5, 0.6 * k + 2.5), max(4.0, 0.6 * k + 2.0)))
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    m = scores(counts)
    ax.set_title(f"{title}\naccuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
                 f"macro F1 {m['macro_f1']:.4f}", fontsize=9)
    fig.tight_layout()
    return fig


# --- WiSE-FT's tables and metrics (harness/engine/wise_ft.py; the picture: wise_ft_panels) -----

def wise_ft_columns(w) -> dict:
    """compare.csv's WiSE-FT columns for one strategy (a WiseFt, or None): the mean chosen
    alpha and the mean accuracies there."""
    import statistics
    if w is None:
        return {}
    out = {"wise_ft_alpha_mean": round(statistics.fmean(w.chosen), 4)}
    out.update({f"wise_ft_{c}_mean": round(statistics.fmean(w.at_chosen(c)), 4) for c in w.conditions if c != "val"})
    return out


def wise_ft_table(rows):
    """compare_wise_ft.csv: per strategy, condition and alpha, the mean accuracy over seeds."""
    import pandas as pd
    records = [{"strategy": r.strategy, "condition": c, "alpha": a, "accuracy_mean": round(m, 4),
                "seeds": len(r.wise_ft.chosen)}
               for r in rows if r.wise_ft is not None for c in r.wise_ft.conditions
               for a, m in zip(r.wise_ft.alphas, r.wise_ft.mean_curve(c))]
    return pd.DataFrame.from_records(records, columns=["strategy", "condition", "alpha", "accuracy_mean", "seeds"])


def wise_ft_markdown(rows) -> str:
    """compare.md's WiSE-FT section: per alpha the mean accuracies, then those at the alphas chosen."""
    import statistics
    rows = [r for r in rows if r.wise_ft is not None]
    if not rows:
        return ""
    conditions = rows[0].wise_ft.conditions
    lines = ["| strategy | alpha | " + " | ".join(conditions) + " |", "|" + "---|" * (len(conditions) + 2)]
    for r in rows:
        w = r.wise_ft
        means = {c: w.mean_curve(c) for c in conditions}
        for i, a in enumerate(w.alphas):
            lines.append(f"| {r.strategy} | {a:g} | " + " | ".join(f"{means[c][i]:.4f}" for c in conditions) + " |")
        lines.append(f"| {r.strategy} | chosen on val ({', '.join(f'{a:g}' for a in w.chosen)}) | "
                     + " | ".join(f"{statistics.fmean(w.at_chosen(c)):.4f}" for c in conditions) + " |")
    return ("## WiSE-FT: (1 - alpha) start model + alpha fine-tuned (mean over seeds; alpha chosen per "
            "seed on its validation split)\n\n" + "\n".join(lines) + "\n\n")


def wise_ft_metrics(rows) -> tuple[dict[int, dict[str, float]], dict[str, list[float]]]:
    """The compare run's WiSE-FT metrics: each mean curve `wise_ft/<condition>/<strategy>` at
    step alpha x 1000 (the grid's alphas differ by at least 0.001), and per seed (step k) the
    chosen alpha `wise_ft_alpha/<strategy>` and the accuracies there `wise_ft_accuracy/<condition>/<strategy>`."""
    curves: dict[int, dict[str, float]] = {}
    per_seed: dict[str, list[float]] = {}
    for r in rows:
        w = r.wise_ft
        if w is None:
            continue
        for c in w.conditions:
            for a, m in zip(w.alphas, w.mean_curve(c)):
                curves.setdefault(round(1000 * a), {})[f"wise_ft/{c}/{r.strategy}"] = m
            per_seed[f"wise_ft_accuracy/{c}/{r.strategy}"] = w.at_chosen(c)
        per_seed[f"wise_ft_alpha/{r.strategy}"] = list(w.chosen)
    return curves, per_seed
