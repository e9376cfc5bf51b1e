"""Figures a person reads: labelled axes, colour bars, readable legends; atomic, repeatable PNGs."""

import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from ambient_med.evaluation import figures


@pytest.fixture
def drawn(monkeypatch):
    """Every matplotlib figure written, kept for inspection (the file is still written)."""
    kept = []
    save = figures.save_figure

    def keep(figure, path):
        kept.append(figure)
        save(figure, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return kept


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # something is drawn, not a blank canvas
    return pixels


def test_loss_curve_has_labelled_axes_ticks_and_a_legend(tmp_path, drawn):
    steps = np.arange(1, 301)
    loss = 0.5 * np.exp(-steps / 80) + 0.01 * np.random.default_rng(0).random(300) + 0.02
    figures.loss_curve(tmp_path / "loss.png", steps, loss, "ambient/kspace training loss per step")
    _png(tmp_path / "loss.png")
    (axes,) = drawn[0].axes
    assert axes.get_xlabel() == "training step" and axes.get_ylabel() == "loss"
    assert axes.get_title() == "ambient/kspace training loss per step"
    assert len(axes.get_xticks()) >= 3 and len(axes.get_yticks()) >= 2
    labels = [t.get_text() for t in axes.get_legend().get_texts()]
    assert labels == ["per step", "moving average (25 steps)"]
    assert axes.get_yscale() == "log"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # nothing left beside it


def test_figures_are_the_same_bytes_on_a_rerun(tmp_path):
    steps, loss = np.arange(1, 51), np.linspace(1.0, 0.1, 50)
    figures.loss_curve(tmp_path / "a.png", steps, loss, "loss")
    figures.loss_curve(tmp_path / "b.png", steps, loss, "loss")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_a_few_steps_and_non_finite_losses_still_plot(tmp_path):
    figures.loss_curve(
        tmp_path / "six.png", np.arange(1, 7), np.array([1, 0.8, 0.9, 0.7, 0.6, 0.65]), "t"
    )
    figures.loss_curve(tmp_path / "nan.png", np.arange(1, 4), np.full(3, np.nan), "t")
    for name in ("six.png", "nan.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


def test_recon_panel_has_colour_bars_error_maps_and_psnr(tmp_path, drawn):
    rng = np.random.default_rng(1)
    reference = np.zeros((32, 32), np.float32)
    reference[8:24, 8:24] = 1.0
    columns = [("reference", reference)] + [
        (name, reference + sigma * rng.standard_normal(reference.shape).astype(np.float32))
        for name, sigma in (("zero_filled", 0.2), ("cs_l1", 0.05), ("diffusion_dc", 0.02))
    ]
    figures.recon_panel(tmp_path / "panel.png", columns, reference)
    _png(tmp_path / "panel.png")
    figure = drawn[0]
    images = [a for a in figure.axes if a.get_images() and a.get_label() != "<colorbar>"]
    bars = [a for a in figure.axes if a.get_label() == "<colorbar>"]
    assert len(images) == 2 * len(columns) and len(bars) == 2
    assert {b.get_ylabel() for b in bars} == {"intensity", "|error|"}
    titles = [a.get_title() for a in images if a.get_title()]
    assert titles[0] == "reference"
    psnr = [float(t.split("\n")[1].split()[0]) for t in titles[1:]]
    assert psnr == sorted(psnr)  # less noise, higher PSNR, as the titles say


def test_recon_panel_of_a_new_scan_claims_no_psnr(tmp_path, drawn):
    zero_filled = np.random.default_rng(2).random((16, 16)).astype(np.float32)
    columns = [("zero_filled", zero_filled), ("diffusion_dc", zero_filled * 0.9)]
    figures.recon_panel(tmp_path / "new.png", columns, zero_filled, scored=False)
    titles = [a.get_title() for a in drawn[0].axes if a.get_title()]
    assert titles == ["zero_filled", "diffusion_dc"]
    bars = [a.get_ylabel() for a in drawn[0].axes if a.get_label() == "<colorbar>"]
    assert "|difference from zero_filled|" in bars


def test_audit_histogram_shows_both_sets_the_threshold_and_controls(tmp_path, drawn):
    rng = np.random.default_rng(3)
    holdout, samples = rng.normal(0.5, 0.1, 200), rng.normal(0.45, 0.1, 64)
    controls = {"exact copies": np.full(32, 1.0), "shifted by 1 pixel": rng.normal(0.9, 0.02, 32)}
    figures.audit_histogram(tmp_path / "audit.png", holdout, samples, 0.75, controls)
    _png(tmp_path / "audit.png")
    (axes,) = drawn[0].axes
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend[0].startswith("held-out real slices (n = 200")
    assert legend[1].startswith("generated samples (n = 64")
    assert legend[2] == "exact copies (n = 32, 100.0 % above)"
    assert axes.get_xlabel() and axes.get_ylabel() == "fraction of each set"
    assert any(line.get_xdata()[0] == 0.75 for line in axes.get_lines())  # the threshold


def test_memorization_curve_legend_reads_as_words(tmp_path, drawn):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import memorization
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [
        {
            "train_mode": mode,
            "corruption": kind,
            "n_train": n,
            "b_redraw": redraw,
            "frac_above": frac,
            "psnr_r4": psnr,
        }
        for mode, kind, redraw, frac, psnr in (
            ("clean", "kspace", False, 0.2, 25.0),
            ("ambient", "kspace", False, 0.02, 24.0),
            ("ambient", "kspace", True, 0.03, 23.5),
            ("ambient", "pixel", False, 0.01, float("nan")),
        )
        for n in (16, 64)
    ]
    memorization.curve_png(tmp_path / "curve.png", rows)
    _png(tmp_path / "curve.png")
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert "clean images (baseline)" in legend
    assert "ambient on k-space lines, R = 4, B redrawn every step" in legend
    assert not any("/" in text or "False" in text or "True" in text for text in legend)
    copies, tradeoff = drawn[0].axes
    assert "threshold" in copies.get_ylabel() and "PSNR" in tradeoff.get_ylabel()
