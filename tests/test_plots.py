"""Plots draw what the numbers say (bar heights, error bars, curves)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from segjax import plots, writers


def test_study_bars_are_means_with_std_error_bars():
    rows = [
        {"variant": "a", "seed": 0, "val/miou": 0.5},
        {"variant": "a", "seed": 1, "val/miou": 0.7},
        {"variant": "b", "seed": 0, "val/miou": 0.4},
    ]
    fig = plots.study_bars(rows)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.6, 0.4])
    err = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    segments = err.lines[2][0].get_segments()  # one vertical segment per bar: mean - std .. mean + std
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(2 * np.std([0.5, 0.7], ddof=1))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


def test_training_curves_follow_the_log(tmp_path):
    rows = [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 0.5, "val/miou": 0.3},
        {"step": 3, "train/loss": 0.25},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fig = plots.training_curves(str(tmp_path))
    loss_line, miou_line = fig.axes[0].lines[0], fig.axes[1].lines[0]
    np.testing.assert_array_equal(loss_line.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(loss_line.get_ydata(), [1.0, 0.5, 0.25])
    np.testing.assert_array_equal(miou_line.get_ydata(), [0.3])


def test_keys_nothing_logged_are_errors_not_empty_plots(tmp_path):
    rows = [{"variant": "a", "seed": 0, "val/miou": 0.5}]
    with pytest.raises(KeyError, match=r"\['val/mious'\] are in none of .*\['val/miou'\]"):
        plots.study_bars(rows, "val/mious")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    logged = r"\['val/miou'\] are in none of .*metrics.jsonl; they hold \['step', 'train/loss'\]"
    with pytest.raises(KeyError, match=logged):
        plots.training_curves(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        plots.training_curves(str(tmp_path / "missing"))


def test_a_resumed_runs_log_reads_one_row_per_step(tmp_path):
    """Killed after logging steps 1-4 (checkpoint at 2) in the middle of writing step 5's row,
    then resumed from step 2: the log holds steps 3-4 twice and a cut-off line. The reader gives
    one row per step, the later row winning; the writer ends the cut-off line before appending,
    so the resumed run's first row is whole; the curve runs forward only."""
    first = writers.MetricWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        first.write(step, {"train/loss": 1.0 / step})
    first.write(4, {"val/miou": 0.4})  # validation is a row of its own at the same step
    first.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "train/lo')  # the crash
    resumed = writers.MetricWriter(str(tmp_path))
    for step in (3, 4, 5):
        resumed.write(step, {"train/loss": 0.9 / step})
    resumed.close()
    log = writers.read_log(str(tmp_path))
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["train/loss"] for r in log] == [1.0, 0.5, 0.3, 0.225, 0.18]  # 0.9 / step after the resume
    assert log[3]["val/miou"] == 0.4  # the first run's validation row is kept where nothing replaced it
    fig = plots.training_curves(str(tmp_path), keys=("train/loss",))
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [1, 2, 3, 4, 5])


def test_comparison_plot_draws_each_paired_difference_and_its_interval():
    rows = [{"variant": "ref", "seed": s, "val/miou": v} for s, v in enumerate((0.5, 0.6, 0.7))]
    rows += [{"variant": "b", "seed": s, "val/miou": v} for s, v in enumerate((0.6, 0.8, 1.0))]  # +0.1, +0.2, +0.3
    rows += [{"variant": "c", "seed": 0, "val/miou": 0.4}]  # one pair: -0.1, no interval
    ax = plots.comparison(rows, "val/miou", "ref").axes[0]
    interval, dot_b, dot_c = (line for line in ax.lines if line.get_linestyle() != "--")
    half = 4.3027 * 0.1 / np.sqrt(3)  # t(0.975, df 2) x sd 0.1 / sqrt 3 (tests/test_compare.py)
    np.testing.assert_allclose(interval.get_xdata(), [0.2 - half, 0.2 + half], atol=1e-4)
    assert dot_b.get_xdata()[0] == pytest.approx(0.2) and dot_c.get_xdata()[0] == pytest.approx(-0.1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "c"]
    with pytest.raises(KeyError, match="reference variant 'unet' has no finished run"):
        plots.comparison(rows, "val/miou", "unet")


def test_confusion_heatmap_shows_each_true_class_as_row_fractions(tmp_path):
    """A hand-made table: the image holds each row divided by its sum; the cells name the counts;
    a class absent from the truth leaves its row at 0 (not a division by zero)."""
    path = tmp_path / "val_confusion.csv"
    path.write_text("truth,bg,cell,edge\nbg,90,10,0\ncell,5,15,0\nedge,0,0,0\n")
    ax = plots.confusion(str(path)).axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.9, 0.1, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 0.0]])
    assert "0.75\n15" in [t.get_text() for t in ax.texts]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bg", "cell", "edge"]
    for text in ("index,name\n0,a\n", "", "truth,a,b\nb,1,2\na,3,4\n"):  # another table, none, rows out of order
        (tmp_path / "other.csv").write_text(text)
        with pytest.raises(ValueError, match="is not a confusion table"):
            plots.confusion(str(tmp_path / "other.csv"))
    (tmp_path / "other.csv").write_text("truth,a,b\na,1\nb,3,4\n")
    with pytest.raises(ValueError, match="every row of a confusion table has 3 cells"):
        plots.confusion(str(tmp_path / "other.csv"))


def test_a_class_named_truth_keeps_its_row_and_column(tmp_path):
    """The confusion table's cells are written and read by position: a class named like the
    header's first cell ('truth') neither overwrites its row's name nor loses its counts."""
    from segjax import image_tables

    matrix = np.array([[7, 1, 0], [2, 9, 3], [0, 4, 5]])
    path = str(tmp_path / "val_confusion.csv")
    image_tables.write_confusion(path, matrix, ("background", "truth", "edge"))
    with open(path, encoding="utf-8") as f:
        assert f.read().splitlines() == ["truth,background,truth,edge", "background,7,1,0", "truth,2,9,3", "edge,0,4,5"]
    names, counts = image_tables.read_confusion(path)
    assert names == ["background", "truth", "edge"] and counts.tolist() == matrix.tolist()
    ax = plots.confusion(path).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["background", "truth", "edge"]
    np.testing.assert_allclose(ax.images[0].get_array()[1], [2 / 14, 9 / 14, 3 / 14])
