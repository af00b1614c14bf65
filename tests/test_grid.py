import argparse

import pytest
from PIL import Image

from lorabooth.config.checks import finite_floats
from lorabooth.generation import Setting, prompt_slug, settings_grid
from lorabooth.reports.grid import PAD, Layout, make_grid


def test_layout_arithmetic():
    lay = Layout(rows=2, cols=3, cell_w=10, cell_h=20, label_w=50, header_h=15)
    assert lay.size == (50 + 3 * (10 + PAD) + PAD, 15 + 2 * (20 + PAD) + PAD)
    assert lay.cell_origin(0, 0) == (50 + PAD, 15 + PAD)
    assert lay.cell_origin(1, 2) == (50 + PAD + 2 * (10 + PAD), 15 + PAD + (20 + PAD))


def test_grid_places_each_image_in_its_cell():
    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
    images = [[Image.new("RGB", (64, 64), c) for c in row] for row in colours]
    grid = make_grid(images, ["row a", "row b"], ["seed 0", "seed 1"], title="t", min_cell=128)
    # find the red cell: its centre pixel is pure red; the blue one sits below it
    px = grid.load()
    reds = [(x, y) for x in range(0, grid.width, 8) for y in range(0, grid.height, 8)
            if px[x, y] == (255, 0, 0)]
    blues = [(x, y) for x in range(0, grid.width, 8) for y in range(0, grid.height, 8)
             if px[x, y] == (0, 0, 255)]
    assert reds and blues
    assert min(y for _, y in blues) > max(y for _, y in reds)  # row 2 below row 1
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # cells enlarged to 128 px
    # labels are drawn: the left margin has dark pixels
    left = grid.crop((0, 0, 40, grid.height)).convert("L")
    assert left.getextrema()[0] < 100


def test_grid_rejects_mismatched_labels():
    im = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError):
        make_grid([[im, im]], ["a"], ["only one"])


def test_settings_grid_is_the_full_product_in_order():
    grid = settings_grid([0.0, 1.0], [1.0], [3.0, 7.5])
    assert grid == [Setting(0.0, 1.0, 3.0), Setting(0.0, 1.0, 7.5),
                    Setting(1.0, 1.0, 3.0), Setting(1.0, 1.0, 7.5)]
    assert grid[1].label == "unet 0 | text 1 | cfg 7.5"


def test_comma_lists_of_scales_parse_as_the_cli_parses_them():
    assert finite_floats("0,0.5, 1") == [0.0, 0.5, 1.0]
    assert finite_floats("7.5,") == [7.5]
    for text, fragment in (("7.5,high", "separated by commas"), (",", "at least one number"),
                           ("1,nan", "finite"), ("inf", "finite")):
        with pytest.raises(argparse.ArgumentTypeError, match=fragment):
            finite_floats(text)


def test_prompt_slug():
    assert prompt_slug(3, "A photo of <sks> dog!") == "03-a-photo-of-sks-dog"
