"""Labelled image grids: rows and columns named by their setting values."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PAD = 6
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclass(frozen=True)
class Layout:
    """Pixel geometry of a grid; pure arithmetic so it is testable alone."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    label_w: int  # width of the row-label column on the left
    header_h: int  # height of the column-label row on top

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_w + self.cols * (self.cell_w + PAD) + PAD,
                self.header_h + self.rows * (self.cell_h + PAD) + PAD)

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        return (self.label_w + PAD + col * (self.cell_w + PAD),
                self.header_h + PAD + row * (self.cell_h + PAD))


def font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled scalable font: legible at any size, no system fonts needed.
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, face) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    return right - left, bottom - top


def layout_for(rows: int, cols: int, cell: tuple[int, int], row_labels: list[str],
               col_labels: list[str], face) -> Layout:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, t, face)[0] for t in row_labels] + [0]) + 2 * PAD
    header_h = max([_text_size(probe, t, face)[1] for t in col_labels] + [0]) + 2 * PAD
    return Layout(rows, cols, cell[0], cell[1], label_w, header_h)


def make_grid(images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
              title: str = "", font_size: int = 16, min_cell: int = 128) -> Image.Image:
    """``images[r][c]`` in a grid with ``row_labels`` on the left and
    ``col_labels`` on top. Small images are enlarged (nearest) to ``min_cell``
    so labels stay legible beside them."""
    if len(images) != len(row_labels) or any(len(r) != len(col_labels) for r in images):
        raise ValueError("grid: labels do not match the images' rows and columns")
    w, h = images[0][0].size
    scale = max(1, -(-min_cell // max(w, h)))  # ceil division
    cell = (w * scale, h * scale)
    face = font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # columns as wide as their labels, so long setting names never overlap
    pitch = (max([cell[0]] + [_text_size(probe, t, face)[0] + PAD for t in col_labels]), cell[1])
    layout = layout_for(len(row_labels), len(col_labels), pitch, row_labels, col_labels, face)
    title_h = (font_size + 2 * PAD) if title else 0
    width, height = layout.size
    canvas = Image.new("RGB", (width, height + title_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), title, fill=INK, font=face)
    for c, text in enumerate(col_labels):
        x, _ = layout.cell_origin(0, c)
        draw.text((x, title_h + PAD), text, fill=INK, font=face)
    for r, text in enumerate(row_labels):
        _, y = layout.cell_origin(r, 0)
        draw.text((PAD, title_h + y + cell[1] // 2), text, fill=INK, font=face, anchor="lm")
        for c, image in enumerate(images[r]):
            x, y = layout.cell_origin(r, c)
            x += (pitch[0] - cell[0]) // 2
            canvas.paste(image.resize(cell, Image.Resampling.NEAREST), (x, title_h + y))
    return canvas
