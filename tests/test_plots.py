"""Figures for papers: every plot as a vector PDF and a >= 200 dpi PNG, legends outside the data,
one colour per method across all plots, a caption per plot in the report."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_workflow import build_fixture_tables, fixture_workdir, run_script  # noqa: F401  (fixture)

SCRIPTS = REPO_ROOT / "workflow" / "scripts"
NAMES = ("accuracy_vs_bits", "training_curves", "importance_weights")


def png_dpi(path: Path) -> float:
    """Resolution from the PNG's pHYs chunk (pixels per metre)."""
    data = path.read_bytes()
    at = data.index(b"pHYs")
    x_per_metre, _, unit = struct.unpack(">IIB", data[at + 4:at + 13])
    assert unit == 1
    return x_per_metre * 0.0254


@pytest.fixture()
def plotted(fixture_workdir):  # noqa: F811
    build_fixture_tables(fixture_workdir)
    run_script("plots.py", "--runs", "results/runs.csv", "--histories", "results/runs/histories.csv",
               "--out-dir", "results/plots", cwd=fixture_workdir)
    return fixture_workdir / "results" / "plots"


def test_every_plot_is_a_vector_pdf_and_a_200_dpi_png(plotted):
    for name in NAMES:
        pdf = (plotted / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and b"/Subtype /Image" not in pdf  # vector: no raster image inside
        png = plotted / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png_dpi(png) >= 199.5


def test_legends_sit_outside_every_axes_and_colours_follow_the_method(fixture_workdir, monkeypatch):  # noqa: F811
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    build_fixture_tables(fixture_workdir)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("plots", None)
    import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    runs = pd.read_csv(fixture_workdir / "results" / "runs.csv", dtype={"teacher_bits": str},
                       keep_default_na=False, na_values=[""])
    histories = pd.read_csv(fixture_workdir / "results" / "runs" / "histories.csv", dtype={"teacher_bits": str},
                            keep_default_na=False, na_values=[""])
    for frame in (runs, histories):
        frame["teacher_bits"] = frame["teacher_bits"].fillna(plots.NO_TEACHERS)
    plots.accuracy_vs_bits(runs, Path("a.png"))
    plots.training_curves(histories, runs, Path("t.png"))
    plots.importance_weights(histories, Path("i.png"))
    assert len(figures) == 3
    colours: dict[str, set] = {}
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert len(fig.legends) == 1
        legend_box = fig.legends[0].get_window_extent(renderer)
        for ax in fig.axes:
            assert ax.get_legend() is None
            if ax.get_visible():
                assert not legend_box.overlaps(ax.get_window_extent(renderer)), "legend over the data"
        if fig is not figures[2]:  # the importance plot colours teachers, not methods
            for ax in fig.axes:
                for line in ax.get_lines():
                    method = line.get_label().split(" [")[0]
                    if not method.startswith("_"):
                        colours.setdefault(method, set()).add(matplotlib.colors.to_hex(line.get_color()))
        plt.close(fig)
    assert len(colours) >= 3
    for method, seen in colours.items():
        assert seen == {matplotlib.colors.to_hex(plots.method_color(method))}, method
    assert len({plots.method_color(m) for m in plots.METHODS}) == len(plots.METHODS)


def test_teachers_of_different_bit_widths_never_share_a_colour(monkeypatch):
    """Importance weights of a W2A2 grid (teachers 8/6/4) beside a W4A4 one (8/6/5): teacher 2 is 4-bit in
    one row and 5-bit in the other; each legend entry has its own colour, none the uniform line's grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("plots", None)
    import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    rows = [{"method": "cmtkd", "dataset": "digits", "arch": "alexnet", "w_bits": w, "a_bits": w, "teacher_bits": t,
             "seed": 0, "epoch": e, **{f"pi_conv2_{i}": 1 / 3 for i in range(3)}}
            for w, t in ((2, "8-6-4"), (4, "8-6-5")) for e in (1, 2)]
    # ResNet-18 fuses at layer1: its row shows layer1 only, AlexNet's rows conv2 only (no empty panels).
    rows += [{"method": "cmtkd", "dataset": "digits", "arch": "resnet18", "w_bits": 2, "a_bits": 2,
              "teacher_bits": "8-6-4", "seed": 0, "epoch": e, **{f"pi_layer1_{i}": 1 / 3 for i in range(3)}}
             for e in (1, 2)]
    plots.importance_weights(pd.DataFrame(rows), Path("i.png"))
    titles = [ax.get_title().split("\n")[0] for ax in figures[0].axes if ax.get_visible()]
    assert titles == ["conv2", "conv2", "layer1"] and len(figures[0].axes) == 3
    colour_of: dict[str, str] = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            colour_of.setdefault(line.get_label(), matplotlib.colors.to_hex(line.get_color()))
    plt.close(figures[0])
    teachers = {label: colour for label, colour in colour_of.items() if label.startswith("teacher")}
    assert set(teachers) == {"teacher 0 (8-bit)", "teacher 1 (6-bit)", "teacher 2 (4-bit)", "teacher 2 (5-bit)"}
    assert len(set(teachers.values())) == 4
    assert matplotlib.colors.to_hex(colour_of["uniform 1/3"]) not in teachers.values()
    assert len({plots.teacher_color(b, 0) for b in range(2, 9)}) == 7  # 2- to 8-bit: all distinct


def test_every_plot_has_a_report_caption_and_a_pdf_output():
    rule = (REPO_ROOT / "workflow" / "rules" / "plots.smk").read_text()
    assert '.pdf"' in rule
    for name in NAMES:
        caption = (REPO_ROOT / "workflow" / "report" / f"{name}.rst").read_text()
        assert len(caption.split()) > 15 and f"{name}.pdf" in caption


def test_a_full_precision_teacher_is_labelled_fp_in_tables_and_plots():
    sys.path.insert(0, str(SCRIPTS))
    import make_tables
    import plots

    assert plots.method_label("kd", "32") == "kd [FP]" and plots.method_label("kd", "8") == "kd [8]"
    assert make_tables.teachers_label("32") == "FP" and make_tables.teachers_label("8-6-4") == "8-6-4"
    assert make_tables.teachers_label("none") == "—"
