"""`lorabooth prepare` on a messy folder like the ones users bring."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorabooth.commands.cli import main
from lorabooth.config import PrepareConfig
from lorabooth.core.errors import UserError
from lorabooth.photos.prepare import prepare

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench" / "images"


def _photo(seed: int, size=(300, 240)) -> Image.Image:
    """A smooth random picture: distinct seeds give distinct perceptual hashes."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _messy(src: Path) -> dict[str, str]:
    """One file of each kind; returns the expected fate of each."""
    src.mkdir()
    _photo(1).save(src / "good.jpg", quality=95)
    _photo(2).save(src / "png_as_jpg.jpg", format="PNG")  # HEIC-export style wrong extension
    rgba = _photo(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(src / "alpha.png")
    _photo(4).convert("CMYK").save(src / "cmyk.jpg")
    _photo(5).convert("P").save(src / "palette.gif")
    _photo(6).save(src / "bitmap.bmp")
    _photo(7).save(src / "web.webp", quality=90)
    Image.fromarray((np.asarray(_photo(8).convert("L"), dtype=np.uint16) * 257)).save(src / "sixteen.tif")
    shutil.copy(src / "good.jpg", src / "good_copy.jpg")
    _photo(1).resize((250, 200)).save(src / "screenshot_of_good.png")  # near-duplicate
    (src / "empty.jpg").write_bytes(b"")
    data = (src / "good.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (src / "notes.jpg").write_text("this is a text file named like a photo")
    _photo(9, size=(40, 30)).save(src / "tiny.png")
    return {
        "good.jpg": "kept", "png_as_jpg.jpg": "kept", "alpha.png": "kept", "cmyk.jpg": "kept",
        "palette.gif": "kept", "bitmap.bmp": "kept", "web.webp": "kept", "sixteen.tif": "kept",
        "good_copy.jpg": "exact duplicate of good.jpg",
        "screenshot_of_good.png": "near-duplicate of good.jpg",
        "empty.jpg": "empty file", "truncated.jpg": "truncated or corrupt",
        "corrupt.png": "truncated or corrupt", "notes.jpg": "not an image",
        "tiny.png": "too small",
    }


def test_messy_folder_every_file_accounted_for(tmp_path, caplog):
    expected = _messy(tmp_path / "src")
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    out = tmp_path / "out"
    entries = prepare(PrepareConfig(src=str(tmp_path / "src"), out=str(out), resolution=128,
                                    caption="a photo of {identifier} {class}", class_noun="toy"))
    report = json.loads((out / "prepare.json").read_text())
    fates = {f["source"]: f["reason"] for f in report["files"]}
    assert set(fates) == set(expected)  # every file accounted for
    for name, want in expected.items():
        assert fates[name].startswith(want), (name, fates[name])
    assert report["kept"] == 8 and report["rejected"] == 7
    # one warning line per rejected file, naming it
    rejected_lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected_lines) == 7 and all("\n" not in line for line in rejected_lines)
    # outputs: square PNGs at the resolution, captions beside them
    kept = [e for e in entries if e.kept]
    for e in kept:
        with Image.open(out / e.output) as im:
            assert im.format == "PNG" and im.size == (128, 128) and im.mode == "RGB"
        assert (out / e.output).with_suffix(".txt").read_text() == "a photo of sks toy\n"
    assert (out / "contact_sheet.png").is_file()
    # SRC untouched
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before
    # alpha went over white: a half-transparent picture is lighter than the original
    alpha = next(e for e in kept if e.source == "alpha.png")
    assert np.asarray(Image.open(out / alpha.output)).mean() > np.asarray(_photo(3)).mean()


def test_nothing_kept_is_exit_2_with_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_text("nope")
    code = main(["prepare", str(src), str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "none of 1 files" in err[0]


def test_cli_exit_0_when_something_is_kept(tmp_path):
    _messy(tmp_path / "src")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--resolution", "64"]) == 0


def test_prepare_runs_in_a_worker_thread(tmp_path):
    """The UI runs prepare off the main thread, where no signal handler can be set."""
    import threading

    _messy(tmp_path / "src")
    done = []
    worker = threading.Thread(target=lambda: done.append(prepare(PrepareConfig(
        src=str(tmp_path / "src"), out=str(tmp_path / "out"), resolution=64))))
    worker.start()
    worker.join()
    assert done and not (tmp_path / "out" / ".lock").exists()


@pytest.mark.parametrize("kwargs,option", [
    (dict(resolution=100), "--resolution"), (dict(crop="square"), "--crop"),
    (dict(dedupe_threshold=99), "--dedupe-threshold"), (dict(face_margin=-1), "--face-margin"),
    (dict(caption="a {class}"), "--class-noun"),
])
def test_bad_prepare_options(tmp_path, kwargs, option):
    with pytest.raises(UserError, match=option):
        PrepareConfig(src="s", out="o", **kwargs)


def test_out_must_not_be_src(tmp_path):
    _messy(tmp_path / "src")
    with pytest.raises(UserError, match="must differ from SRC"):
        prepare(PrepareConfig(src=str(tmp_path / "src"), out=str(tmp_path / "src")))


def test_face_crop_contains_the_astronauts_face(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(src / "astronaut.png")
    (entry,) = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "out"), crop="face",
                                     resolution=256))
    assert entry.kept and entry.crop == "face" and not entry.warnings
    left, top, right, bottom = entry.crop_box
    fx, fy, fw = 177, 66, 95  # the face's box in the photo
    assert left <= fx and top <= fy and right >= fx + fw and bottom >= fy + fw
    assert right - left == bottom - top and (right - left) < 512  # a crop, not the whole photo


def test_face_crop_falls_back_to_center_with_a_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(1).save(src / "noface.png")
    (entry,) = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "out"), crop="face",
                                     resolution=64))
    assert entry.kept and entry.crop == "center" and "no face" in entry.warnings[0]
    assert entry.crop_box == (30, 0, 270, 240)


def test_face_box_leaving_the_image_is_padded(tmp_path, monkeypatch):
    import lorabooth.photos.prepare as p

    monkeypatch.setattr(p, "find_faces", lambda im: [(0, 0, 100, 100)])  # a face in the corner
    src = tmp_path / "src"
    src.mkdir()
    _photo(1).save(src / "corner.png")
    (entry,) = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "out"), crop="face",
                                     resolution=64))
    left, top, _, _ = entry.crop_box
    assert left < 0 and top < 0
    assert Image.open(tmp_path / "out" / entry.output).size == (64, 64)


def test_crop_none_keeps_the_aspect(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(1).save(src / "wide.png")
    (entry,) = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "out"), crop="none",
                                     resolution=120))
    assert Image.open(tmp_path / "out" / entry.output).size == (150, 120)


def test_interrupted_prepare_leaves_no_half_written_png(tmp_path, monkeypatch):
    _messy(tmp_path / "src")
    out = tmp_path / "out"
    real_save = Image.Image.save
    calls = {"n": 0}

    def dying_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third output: write half of it, then die
            buf = io.BytesIO()
            real_save(self, buf, *args, **kwargs)
            Path(fp).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(src=str(tmp_path / "src"), out=str(out), resolution=64))
    monkeypatch.undo()
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 2 and not list(out.glob(".*"))
    for png in pngs:
        with Image.open(png) as im:
            im.load()  # complete files only


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="../shared/dreambench is absent")
@pytest.mark.parametrize("subject", ["dog", "rc_car"])
def test_dreambench_photos_are_all_kept(tmp_path, subject):
    entries = prepare(PrepareConfig(src=str(DREAMBENCH / subject), out=str(tmp_path / "out"),
                                    resolution=128))
    assert entries and all(e.kept for e in entries), [(e.source, e.reason) for e in entries]


def test_contact_sheet_is_capped_and_originals_are_not_held(tmp_path, monkeypatch):
    """Thumbnails are made as each photo is kept: once the loop is done no
    decoded original is alive; the sheet shows at most SHEET_MAX photos."""
    import gc
    import weakref

    import lorabooth.photos.prepare as P

    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        _photo(i, size=(120, 96)).save(src / f"p{i}.png")
    decoded, alive_at_sheet = [], {}
    real_decode, real_sheet = P.decode, P.contact_sheet

    def tracking_decode(path):
        im, fmt = real_decode(path)
        decoded.append(weakref.ref(im))
        return im, fmt

    def counting_sheet(thumbs, total):
        gc.collect()
        alive_at_sheet["n"] = sum(ref() is not None for ref in decoded)
        return real_sheet(thumbs, total)

    monkeypatch.setattr(P, "decode", tracking_decode)
    monkeypatch.setattr(P, "contact_sheet", counting_sheet)
    monkeypatch.setattr(P, "SHEET_MAX", 4)
    entries = prepare(PrepareConfig(src=str(src), out=str(tmp_path / "out"), resolution=64,
                                    dedupe_threshold=-1))
    assert sum(e.kept for e in entries) == 7 and len(decoded) == 7
    assert alive_at_sheet["n"] == 0
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size == (4 * (P.CELL + 8) + 8, P.CELL + 20 + 16)  # 4 cells, one row
    monkeypatch.undo()
    thumb = P.thumbnail(_photo(1, size=(120, 96)), (12, 0, 108, 96), "x.png")
    big = P.contact_sheet([thumb] * (P.SHEET_MAX + 50), P.SHEET_MAX + 50)
    rows = -(-P.SHEET_MAX // 5)
    assert big.size == (5 * (P.CELL + 8) + 8, rows * (P.CELL + 28) + 8)
