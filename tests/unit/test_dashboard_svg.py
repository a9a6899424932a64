"""The dashboard's SVG charts (mailsuite/dashboard/svg.py): what is drawn for given values."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from mailsuite.dashboard.svg import Series, bar_chart, line_chart

NS = "{http://www.w3.org/2000/svg}"


def bars(chart: str) -> list[ET.Element]:
    return [e for e in ET.fromstring(chart).iter(f"{NS}rect") if "bar" in e.get("class", "")]


def test_bar_heights_are_proportional_to_the_values_on_a_round_axis():
    chart = bar_chart("In", ["a", "b", "c"], [Series("in", [0, 35, 70])])
    drawn = bars(chart)
    assert [b.get("data-value") for b in drawn] == ["0", "35", "70"]
    heights = [float(b.get("height")) for b in drawn]
    assert heights[0] == 0 and heights[2] == pytest.approx(2 * heights[1], abs=0.1)
    # The axis goes to 100 (1, 2 or 5 times a power of ten above 70), labelled at its top.
    assert ">100</text>" in chart and ">50</text>" in chart
    plot_height = 220 - 44 - 28
    assert heights[2] == pytest.approx(0.7 * plot_height, abs=0.1)
    # Bars stand on the x axis.
    assert {round(float(b.get("y")) + float(b.get("height")), 1) for b in drawn} == {176.0}


def test_several_series_are_side_by_side_with_a_legend():
    chart = bar_chart("Messages", ["00", "01"], [Series("in", [1, 2]), Series("out", [3, 4])])
    drawn = bars(chart)
    assert [b.get("class") for b in drawn] == ["bar s0", "bar s1", "bar s0", "bar s1"]
    x = [float(b.get("x")) for b in drawn]
    assert x == sorted(x)
    assert ">in</text>" in chart and ">out</text>" in chart
    assert "<title>00 in: 1</title>" in chart


def test_an_empty_chart_still_has_an_axis_and_no_division_by_zero():
    chart = bar_chart("Nothing", ["a"], [Series("n", [0])])
    assert [b.get("height") for b in bars(chart)] == ["0"]
    assert ">2</text>" in chart and ">1</text>" in chart
    ET.fromstring(bar_chart("None at all", [], [Series("n", [])]))


def test_text_is_escaped_and_the_output_is_well_formed_xml():
    chart = bar_chart('<script>"x"</script>', ["<b>&"], [Series("a<b", [1])])
    ET.fromstring(chart)  # raises on anything unescaped
    assert "<script>" not in chart and "&lt;script&gt;" in chart


def test_x_labels_every_nth():
    chart = bar_chart("Hours", [f"{h:02d}" for h in range(24)], [Series("n", [1] * 24)],
                      label_every=6)
    labels = re.findall(r'text-anchor="middle">(\d\d)</text>', chart)
    assert labels == ["00", "06", "12", "18"]


def test_same_data_same_bytes_and_mismatched_lengths_refused():
    args = ("T", ["a", "b"], [Series("s", [1.25, 3])])
    assert bar_chart(*args) == bar_chart(*args)
    with pytest.raises(ValueError):
        bar_chart("T", ["a", "b"], [Series("s", [1])])


def test_line_chart_points():
    chart = line_chart("Days", ["1", "2", "3"], [Series("in", [0, 5, 10])])  # axis: 0-10
    line = next(ET.fromstring(chart).iter(f"{NS}polyline"))
    ys = [float(p.split(",")[1]) for p in line.get("points").split()]
    assert ys[0] == 176.0 and ys[2] == 28.0 and ys[1] == pytest.approx(102.0)
