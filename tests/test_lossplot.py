"""The sweep report's loss curves: the EMA, and one smoothed and one faint raw
path per run, each run in its own style, named in the legend."""

import re

import pytest

from lorabooth.reports.lossplot import ema, loss_svg, style


def test_ema_by_hand():
    # weights 0.5 (newest), 0.25, ...; divided by the weight gathered so far
    assert ema([1.0, 3.0, 3.0], 0.5) == pytest.approx(
        [1.0, (0.25 * 1 + 0.5 * 3) / 0.75, (0.125 * 1 + 0.25 * 3 + 0.5 * 3) / 0.875])
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    assert ema([4.0, 1.0], 0.0) == [4.0, 1.0]  # no smoothing: the raw values
    assert ema([], 0.9) == []


def test_ema_follows_the_trend_and_damps_the_noise():
    raw = [10 - 0.05 * i + (1 if i % 2 else -1) for i in range(100)]  # falling, zig-zag
    smooth = ema(raw, 0.9)
    late = range(50, 100)
    assert max(abs(smooth[i] - (10 - 0.05 * i)) for i in late) < 0.7  # near the trend (lag 0.45)
    assert max(abs(smooth[i] - smooth[i - 1]) for i in late) < 0.3 < min(
        abs(raw[i] - raw[i - 1]) for i in late)


def test_ema_rejects_a_weight_outside_0_1():
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], 1.0)


def _paths(svg, kind):
    return re.findall(rf'<path class="{kind}" d="([^"]+)" stroke="([^"]+)"([^>]*)>'
                      rf"<title>([^<]*)</title>", svg)


def test_one_smoothed_and_one_faint_raw_path_per_run():
    runs = [("lr=1e-4", [1, 2, 3], [1.0, 0.5, 0.8]), ("lr=5e-4", [1, 2, 3], [1.0, 0.5, 0.8]),
            ("<b>x</b>", [1, 2], [0.9, 0.7])]
    svg = loss_svg(runs)
    raw, smooth = _paths(svg, "raw"), _paths(svg, "smooth")
    assert [t for *_, t in raw] == [t for *_, t in smooth] == [
        "lr=1e-4", "lr=5e-4", "&lt;b&gt;x&lt;/b&gt;"]
    assert all('stroke-opacity="0.3"' in rest for _, _, rest, _ in raw)  # faint
    assert all("stroke-opacity" not in rest for _, _, rest, _ in smooth)
    # the two runs with equal losses: same raw points, told apart by colour and dashes
    assert raw[0][0] == raw[1][0] and smooth[0][0] == smooth[1][0]
    assert style(0) != style(1) and raw[0][1] != raw[1][1]
    assert len({style(i) for i in range(20)}) == 20
    # the smoothed path is the EMA, not the raw losses again
    assert smooth[0][0] != raw[0][0]
    for name, _, _ in runs:  # the legend names every run
        assert f">{name.replace('<', '&lt;').replace('>', '&gt;')}</text>" in svg
    assert "<b>" not in svg and "http" not in svg


def test_no_losses():
    assert "<svg" not in loss_svg([("a", [], [])])
