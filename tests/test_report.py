"""Tests for harness.report's LR pictures: a frozen group's LR is drawn apart from a training one."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from conftest import tiny_recipe_dict  # noqa: E402
from harness.engine.recipe import Recipe  # noqa: E402
from harness.report import (FROZEN_LABEL, FROZEN_SPAN_LABEL, FROZEN_STYLE, frozen_mask, lr_figure, lr_panel,  # noqa: E402
                            lr_panels)

GROUPS = ["early", "late", "head"]
GREY = to_rgba(FROZEN_STYLE["color"])


def two_phase_result(head_steps: int = 6, all_steps: int = 12):
    """A Result-like record of a two-phase run: the head alone, then every group."""
    n = head_steps + all_steps
    lrs = [[1e-5 * (g + 1) * (1 + t) for g in range(3)] for t in range(n)]
    return SimpleNamespace(group_names=list(GROUPS), lrs=lrs, moms=[0.9] * n,
                           stage_starts=[0, head_steps])


@pytest.fixture
def two_phase():
    # tiny_recipe_dict: stage 1 trains the head (1 epoch), stage 2 every group (2 epochs)
    return Recipe.from_dict(tiny_recipe_dict())


def segments(ax, name=None):
    """(label, linestyle, rgba colour, x values) of every data line on `ax` (axvlines left out)."""
    out = []
    for line in ax.get_lines():
        xs = list(line.get_xdata())
        if len(xs) == 2 and xs[0] == xs[1]:      # a stage boundary (axvline)
            continue
        out.append((line.get_label(), line.get_linestyle(), to_rgba(line.get_color()), xs))
    return out


def test_frozen_mask_of_a_two_phase_recipe(two_phase):
    mask = frozen_mask(two_phase_result(), two_phase)
    assert mask[0] == [True] * 6 + [False] * 12        # early: frozen in the head stage
    assert mask[1] == [True] * 6 + [False] * 12
    assert mask[2] == [False] * 18                     # the head always trains
    assert frozen_mask(two_phase_result(), [1, 3]) == mask   # counts per stage say the same
    assert frozen_mask(two_phase_result(), None) is None


def test_frozen_mask_of_a_surgical_stage_freezes_the_groups_it_does_not_list():
    d = tiny_recipe_dict()
    d["stages"] = [{"epochs": 1, "train": "head", "lr": 1e-3}, {"epochs": 2, "train": {"groups": [0, 2]}, "lr": 1e-3}]
    mask = frozen_mask(two_phase_result(), Recipe.from_dict(d))
    assert mask[0] == [True] * 6 + [False] * 12
    assert mask[1] == [True] * 18                      # the middle group never trains
    assert mask[2] == [False] * 18
    assert frozen_mask(two_phase_result(), [(2,), (0, 2)]) == mask


def test_lr_panel_draws_frozen_steps_dotted_grey_and_training_steps_solid(two_phase):
    fig, ax = plt.subplots()
    try:
        assert lr_panel(ax, two_phase_result(), two_phase) is True
        segs = segments(ax)
        # early and late: a dotted grey frozen segment over steps 0-5, then a solid one in
        # their own colour over 6-17; the head: one solid segment over every step
        for g, name in enumerate(GROUPS[:2]):
            frozen = [s for s in segs if s[0] == f"_{name} (frozen)"]
            training = [s for s in segs if s[0] == name]
            assert len(frozen) == 1 and len(training) == 1, name
            assert frozen[0][1] == ":" and frozen[0][2] == GREY and frozen[0][3] == list(range(6))
            assert training[0][1] == "-" and training[0][2] == to_rgba(f"C{g}")
            assert training[0][3] == list(range(6, 18))
        head = [s for s in segs if "head" in s[0]]
        assert [(s[1], s[2], s[3]) for s in head] == [("-", to_rgba("C2"), list(range(18)))]
        # no training segment is grey and no frozen one is coloured
        for label, style, colour, _ in segs:
            assert (style == ":") == (colour == GREY) == label.endswith("(frozen)"), label
        # and a light band behind the frozen steps (seen even where a frozen LR hides under the head's)
        bands = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
        assert bands == [(-0.5, 5.5)]
    finally:
        plt.close(fig)


def test_lr_figure_legend_names_the_frozen_style(two_phase, tmp_path):
    fig = lr_figure(two_phase_result(), trainable=two_phase)
    try:
        ax = fig.axes[0]
        legend = ax.get_legend()
        texts = [t.get_text() for t in legend.get_texts()]
        assert texts == GROUPS + [FROZEN_LABEL, FROZEN_SPAN_LABEL]
        handles = legend.legend_handles
        assert handles[-2].get_linestyle() == ":" and to_rgba(handles[-2].get_color()) == GREY
        assert all(h.get_linestyle() == "-" for h in handles[:3])
        fig.savefig(tmp_path / "lr.png")
        assert (tmp_path / "lr.png").stat().st_size > 0
    finally:
        plt.close(fig)


def test_lr_figure_without_trainable_draws_every_group_solid():
    fig = lr_figure(two_phase_result())
    try:
        segs = segments(fig.axes[0])
        assert [s[0] for s in segs] == GROUPS
        assert all(s[1] == "-" and s[2] != GREY for s in segs)
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == GROUPS
    finally:
        plt.close(fig)


def test_lr_panels_a_body_frozen_throughout_and_one_legend():
    """compare_figure's LR row: head_only's body is dotted grey at every step, naive's
    groups all solid; the first panel's legend names the frozen style for all panels."""
    naive = SimpleNamespace(strategy="naive", lr_result=two_phase_result(0, 12),
                            recipe=SimpleNamespace(stages=[3]))
    naive.lr_result.stage_starts = [0]
    head_only = SimpleNamespace(strategy="head_only", lr_result=two_phase_result(0, 12),
                                recipe=SimpleNamespace(stages=[1]))
    head_only.lr_result.stage_starts = [0]
    fig = plt.figure()
    try:
        grid = fig.add_gridspec(2, 2)
        first, second = lr_panels(fig, grid, [naive, head_only])
        assert all(s[1] == "-" for s in segments(first))
        body = [s for s in segments(second) if s[0] != "head"]
        assert [(s[0], s[1], s[2]) for s in body] == [("_early (frozen)", ":", GREY), ("_late (frozen)", ":", GREY)]
        assert [t.get_text() for t in first.get_legend().get_texts()] == GROUPS + [FROZEN_LABEL, FROZEN_SPAN_LABEL]
        assert second.get_legend() is None
    finally:
        plt.close(fig)


def test_lr_figure_of_a_body_frozen_throughout_names_it_once():
    result = two_phase_result(0, 12)
    result.stage_starts = [0]
    fig = lr_figure(result, trainable=[1])            # head_only: one stage, the head alone
    try:
        segs = segments(fig.axes[0])
        assert [(s[0], s[1]) for s in segs] == [("_early (frozen)", ":"), ("_late (frozen)", ":"), ("head", "-")]
        texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert texts == ["head", f"{FROZEN_LABEL}\nearly, late: throughout", FROZEN_SPAN_LABEL]   # no colour for a group never drawn in it
    finally:
        plt.close(fig)


# --- the backend: the library leaves it alone, the command line picks Agg ---------------------

def _backend_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter whose backend is svg (a notebook's inline backend
    would do the same); its printed lines."""
    import subprocess
    import sys

    from shipped import REPO
    prelude = "import matplotlib, sys\nmatplotlib.use('svg')\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_the_report_module_leaves_the_backend_alone():
    assert _backend_after("import harness.report\nprint(matplotlib.get_backend())\n"
                          "print('matplotlib.pyplot' in sys.modules)") == ["svg", "False"]


def test_figures_are_drawn_and_saved_without_pyplot(tmp_path):
    from matplotlib.figure import Figure
    fig = lr_figure(SimpleNamespace(group_names=["body", "head"], lrs=[[1e-4, 1e-3]] * 4, moms=[0.9] * 4,
                                    stage_starts=[0]))
    assert isinstance(fig, Figure) and fig not in [plt.figure(n) for n in plt.get_fignums()]
    fig.savefig(tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1000


def test_the_command_line_draws_with_agg():
    code = ("from click.testing import CliRunner\nfrom harness.cli import main\n"
            "CliRunner().invoke(main, ['sweep'])\nprint(matplotlib.get_backend().lower())")
    assert _backend_after(code) == ["agg"]
