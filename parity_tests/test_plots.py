"""``jaxnets.plots``: the figures are checked through their matplotlib objects, never pixels."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import same_color
from matplotlib.contour import ContourSet

from jaxnets.data import make_cubic, make_spiral
from jaxnets.plots import (
    CLASS_NAMES,
    curves_figure,
    decision_regions_figure,
    prediction_grid_figure,
    regression_figure,
    save_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_class_names_follow_label_order():
    fashion = CLASS_NAMES["fashion_mnist"]
    assert len(fashion) == 10 and fashion[0] == "T-shirt/top" and fashion[9] == "Ankle boot"
    assert fashion[4] == "Coat" and fashion[6] == "Shirt"
    assert CLASS_NAMES["mnist"] == tuple("0123456789")
    assert CLASS_NAMES["spiral"] == ("class 0", "class 1", "class 2")


# ----------------------------------------------------------------------------- curves


def history(epochs: int = 10, test_every: int = 3, first_loss: float = 2.0,
            accuracy: bool = True, offset: float = 0.0) -> list[dict]:
    """Per-epoch rows as the trainer writes them: test values only every ``test_every`` epochs."""
    rows = []
    for e in range(1, epochs + 1):
        tested = e % test_every == 0
        loss = first_loss / e + offset
        rows.append({
            "epoch": e, "train_loss": loss,
            "train_accuracy": (0.5 + 0.04 * e) if accuracy else None,
            "test_loss": loss * 1.1 if tested else None,
            "test_accuracy": (0.45 + 0.04 * e) if tested and accuracy else None,
        })
    return rows


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_curves_two_frameworks_loss_and_accuracy():
    jax_rows, torch_rows = history(), history(offset=0.01)
    fig = curves_figure({"jax": jax_rows, "torch": torch_rows}, "mlp_fashion")
    assert len(fig.axes) == 2
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("loss", "accuracy (%)")
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "epoch"
    assert fig.get_suptitle() == "mlp_fashion"
    expected = {"jax train", "jax test", "torch train", "torch test"}
    for ax in (loss_ax, acc_ax):
        lines = lines_by_label(ax)
        assert set(lines) == expected
        assert ax.get_legend() is not None
        assert {t.get_text() for t in ax.get_legend().get_texts()} == expected
        # test lines only at the evaluated epochs (3, 6, 9), all epochs for train
        assert list(lines["jax test"].get_xdata()) == [3, 6, 9]
        assert list(lines["torch train"].get_xdata()) == list(range(1, 11))
        # one colour per framework, different between frameworks; train solid, test dashed
        assert same_color(lines["jax train"].get_color(), lines["jax test"].get_color())
        assert not same_color(lines["jax train"].get_color(), lines["torch train"].get_color())
        assert lines["jax train"].get_linestyle() == "-"
        assert lines["jax test"].get_linestyle() == "--"
        assert lines["jax test"].get_marker() not in (None, "", "None")
    np.testing.assert_allclose(lines_by_label(loss_ax)["torch test"].get_ydata(),
                               [r["test_loss"] for r in torch_rows if r["test_loss"] is not None])
    # accuracy is drawn in percent
    np.testing.assert_allclose(lines_by_label(acc_ax)["jax train"].get_ydata(),
                               [100 * r["train_accuracy"] for r in jax_rows])
    assert loss_ax.get_yscale() == "linear"  # 2.2 / 0.2: ratio 11


def test_curves_log_scale_only_for_a_wide_loss_range():
    wide = curves_figure({"jax": history(epochs=1000, test_every=100, first_loss=50.0)}, "toy")
    assert wide.axes[0].get_yscale() == "log"  # 55 / 0.05: ratio 1100
    assert len(lines_by_label(wide.axes[0])["jax test"].get_xdata()) == 10
    narrow = curves_figure({"jax": history(epochs=50, first_loss=1.0, offset=0.1)}, "toy")
    assert narrow.axes[0].get_yscale() == "linear"  # 1.21 / 0.12: ratio ~10


def test_curves_without_accuracy_have_one_axes():
    fig = curves_figure({"jax": history(accuracy=False), "torch": history(accuracy=False)},
                        "regression_relu")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "loss")
    assert set(lines_by_label(ax)) == {"jax train", "jax test", "torch train", "torch test"}


def test_curves_single_framework():
    fig = curves_figure({"torch": history()}, "t")
    assert [set(lines_by_label(ax)) for ax in fig.axes] == [{"torch train", "torch test"}] * 2


# ----------------------------------------------------------------------------- decision regions


def spiral_scores(x: np.ndarray) -> np.ndarray:
    """Scores from the spiral's own law: class c's angle at radius r is 2 pi c / 3 + 4 pi r / 3."""
    r, theta = np.hypot(x[:, 0], x[:, 1]), np.arctan2(x[:, 0], x[:, 1])
    centres = 2 * np.pi * np.arange(3) / 3 + 4 * np.pi / 3 * r[:, None]
    return np.cos(theta[:, None] - centres)


def centroid_scores(points: np.ndarray, labels: np.ndarray):
    """Nearest class centroid: minus the squared distance to each centroid."""
    centroids = np.stack([points[labels == c].mean(axis=0) for c in range(3)])
    return lambda x: -((x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)


def test_decision_regions_one_panel_per_framework_with_accuracy():
    points, labels = make_spiral(points_per_class=100)
    calls = []

    def recorded(fn):
        def predict(x):
            calls.append(x)
            return fn(x)
        return predict

    predict = {"jax": recorded(spiral_scores), "torch": recorded(centroid_scores(points, labels))}
    fig = decision_regions_figure(points, labels, predict, "spiral_relu", resolution=60)
    assert len(fig.axes) == 2
    assert fig.get_suptitle() == "spiral_relu"
    accuracies = [float(np.mean(spiral_scores(points).argmax(1) == labels)),
                  float(np.mean(centroid_scores(points, labels)(points).argmax(1) == labels))]
    assert accuracies[0] > 0.7 and abs(accuracies[0] - accuracies[1]) > 0.05  # distinguishable
    for ax, fw, acc in zip(fig.axes, ("jax", "torch"), accuracies, strict=True):
        assert ax.get_title() == f"{fw}: accuracy {acc:.1%}"
        assert ax.get_aspect() == 1.0
        assert any(isinstance(c, ContourSet) for c in ax.collections)
        scatter = [c for c in ax.collections if isinstance(c, PathCollection)
                   and not isinstance(c, ContourSet)]
        assert len(scatter) == 1 and len(scatter[0].get_offsets()) == len(points)
    grids = [x for x in calls if len(x) == 60 * 60]
    assert len(grids) == 2
    for grid in grids:  # float32 (M, 2) covering every point, with a margin
        assert grid.dtype == np.float32 and grid.shape == (3600, 2)
        assert (grid.min(axis=0) < points.min(axis=0)).all()
        assert (grid.max(axis=0) > points.max(axis=0)).all()


# ----------------------------------------------------------------------------- regression


def test_regression_band_for_ensembles_line_for_single():
    x, y = make_cubic()
    grid = np.linspace(-1, 1, 50, dtype=np.float32)[:, None]
    single = grid**3 + 0.15
    rng = np.random.default_rng(0)
    members = single[None] + 0.05 * rng.standard_normal((5, 50, 1)).astype(np.float32)
    fig = regression_figure(x, y, grid, {"jax": single, "ReLU (torch)": members}, "cubic")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "y")
    assert fig.get_suptitle() == "cubic"
    lines = lines_by_label(ax)
    assert set(lines) == {"jax", "ReLU (torch) mean of 5"}
    np.testing.assert_allclose(lines["jax"].get_ydata(), single.ravel(), rtol=1e-6)
    mean, std = members[..., 0].mean(axis=0), members[..., 0].std(axis=0)
    np.testing.assert_allclose(lines["ReLU (torch) mean of 5"].get_ydata(), mean, rtol=1e-5)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [b.get_label() for b in bands] == ["ReLU (torch) ± std"]
    band_y = np.concatenate([p.vertices[:, 1] for p in bands[0].get_paths()])
    assert band_y.min() == pytest.approx((mean - std).min(), abs=1e-5)
    assert band_y.max() == pytest.approx((mean + std).max(), abs=1e-5)
    data = [c for c in ax.collections if c.get_label() == "data"]
    assert len(data) == 1 and len(data[0].get_offsets()) == len(x)
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"data", "jax", "ReLU (torch) mean of 5", "ReLU (torch) ± std"}


def test_regression_single_members_have_no_band():
    x, y = make_cubic()
    grid = np.linspace(-1, 1, 40)
    fig = regression_figure(x.ravel(), y.ravel(), grid,
                            {"jax": grid**3, "torch": (grid**3)[None, :, None]}, "cubic")
    ax = fig.axes[0]
    assert set(lines_by_label(ax)) == {"jax", "torch"}  # (1, G, 1) is one member: a plain line
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_regression_rejects_a_prediction_that_does_not_fit_the_grid():
    x, y = make_cubic()
    with pytest.raises(ValueError, match="does not fit a grid of 40"):
        regression_figure(x, y, np.linspace(-1, 1, 40), {"jax": np.zeros(39)}, "cubic")


# ----------------------------------------------------------------------------- prediction grid


def test_prediction_grid_marks_exactly_the_wrong_tiles(fashion):
    images, labels = fashion.test_x[:16], fashion.test_y[:16]
    names = CLASS_NAMES["fashion_mnist"]
    jax_pred, torch_pred = labels.copy(), labels.copy()
    jax_pred[[1, 6]] = (labels[[1, 6]] + 1) % 10
    torch_pred[[6, 11]] = (labels[[6, 11]] + 3) % 10
    fig = prediction_grid_figure(images, labels, {"jax": jax_pred, "torch": torch_pred}, names,
                                 "lenet_fashion", columns=5)
    assert len(fig.axes) == 20  # 4 rows of 5
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 16 and all(not ax.get_visible() for ax in fig.axes[16:])
    wrong = [i for i, ax in enumerate(visible) if ax.get_gid() == "wrong"]
    assert wrong == [1, 6, 11]
    assert all(ax.get_gid() == "right" for i, ax in enumerate(visible) if i not in wrong)
    assert "3 of 16 wrong" in fig.get_suptitle()
    for i, ax in enumerate(visible):
        title = ax.title
        assert same_color(title.get_color(), "red" if i in wrong else "black")
        first, second = title.get_text().split("\n")
        assert first.startswith("jax ") and " · torch " in first
        assert second.startswith("true ")
        assert names[labels[i]].startswith(second.removeprefix("true ").rstrip("."))
        assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), images[i])
        for spine in ax.spines.values():
            assert spine.get_visible()
            if i in wrong:
                assert same_color(spine.get_edgecolor(), "red") and spine.get_linewidth() == 2
            else:
                assert not same_color(spine.get_edgecolor(), "red")


def test_prediction_grid_single_framework_and_channel_layouts(fashion):
    images, labels = fashion.test_x[:16], fashion.test_y[:16]
    pred = labels.copy()
    pred[0] = 4 if labels[0] != 4 else 6  # predicted "Coat" (or "Shirt")
    scaled = images.astype(np.float32) / 255.0
    names = CLASS_NAMES["fashion_mnist"]
    for layout in (scaled[..., None], scaled[:, None]):  # NHWC and NCHW
        fig = prediction_grid_figure(layout, labels, {"jax": pred}, names, "mlp_fashion")
        assert len(fig.axes) == 16  # 2 rows of 8, none hidden
        assert [ax.get_gid() for ax in fig.axes].count("wrong") == 1
        assert fig.axes[0].get_gid() == "wrong"
        assert fig.axes[0].get_title().startswith(f"pred {names[pred[0]]}\ntrue ")
        assert fig.axes[0].get_images()[0].get_array().shape == (28, 28)
        assert "1 of 16 wrong" in fig.get_suptitle()


# ----------------------------------------------------------------------------- saving


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig = curves_figure({"jax": history()}, "saved")
    target = tmp_path / "figures" / "curves.png"
    out = save_figure(fig, target)
    assert out == target and out.is_file()
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in target.parent.iterdir()] == ["curves.png"]
    save_figure(fig, str(target))  # overwriting works, still no leftovers
    assert [p.name for p in target.parent.iterdir()] == ["curves.png"]


def test_save_figure_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    fig = curves_figure({"jax": history()}, "broken")
    fig.text(0.5, 0.5, r"$\frac{$")  # invalid mathtext: drawing it raises
    with pytest.raises(ValueError):
        save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
