import json

import pytest
import torch
from PIL import Image

from lorabooth.config import PrepareConfig
from lorabooth.core.errors import UserError
from lorabooth.photos.prepare import prepare
from lorabooth.training.data import Shuffler, caption_dropout, load_image, readable_images
from test_hostile_files import smooth_photos


def test_readable_images_skips_non_images(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in readable_images(tmp_path)] == ["a.png"]


def test_a_folder_without_a_report_leaves_out_the_contact_sheet(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "contact_sheet.png")
    assert [p.name for p in readable_images(tmp_path)] == ["a.png"]


def test_a_prepare_output_is_the_kept_images_its_report_lists(tmp_path, caplog):
    """What train, evaluate --real, tune, sweep and the UI read from a prepare
    output: its kept images that still exist, never the contact sheet, a
    rejected file's name, an image dropped in later, or a name that is not plain."""
    src, out = smooth_photos(tmp_path / "src", 3), tmp_path / "out"
    (src / "junk.png").write_bytes(b"not a png")
    prepare(PrepareConfig(src=str(src), out=str(out), resolution=32))
    assert [p.name for p in readable_images(out)] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    (out / "photo_1.png").unlink()
    Image.new("RGB", (40, 40)).save(out / "added.png")
    report = json.loads((out / "prepare.json").read_text())
    report["files"] += [{"kept": True, "output": "../out/added.png"},
                        {"kept": True, "output": str(out / "added.png")}]
    (out / "prepare.json").write_text(json.dumps(report))
    assert [p.name for p in readable_images(out)] == ["photo_0.png", "photo_2.png"]
    assert "added.png" in caplog.text and "not listed in its prepare.json" in caplog.text


@pytest.mark.parametrize("text,says", [
    ("{not json", "not a readable report"), ('{"files": 3}', "not a readable report"),
    ('{"running": true, "outputs": [], "files": []}', "did not finish")])
def test_a_bad_or_unfinished_report_is_one_line_naming_it(tmp_path, text, says):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "prepare.json").write_text(text)
    with pytest.raises(UserError, match=says) as e:
        readable_images(tmp_path)
    assert str(tmp_path / "prepare.json") in str(e.value) and "\n" not in str(e.value)


def test_load_image_applies_exif_rotation_and_crops(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "r.jpg", 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # after rotation the image is 20 x 40 (portrait); the centre crop sees both halves
    # stacked vertically: blue on top, red below
    top, bottom = x[:, 1, 8], x[:, 14, 8]
    assert top[2] > top[0] and bottom[0] > bottom[2]


def test_shuffler_visits_everything_each_epoch_and_resumes_exactly():
    s = Shuffler(5, seed=1)
    first = s.take(5)
    assert sorted(first) == list(range(5))
    state = s.state_dict()
    ahead = s.take(7)
    t = Shuffler(5, seed=99)
    t.load_state_dict(state)
    assert t.take(7) == ahead
    assert Shuffler(5, seed=1).take(5) == first  # seeded


def test_transparent_png_trains_on_the_pixels_prepare_and_evaluate_see(tmp_path):
    """Alpha over white everywhere: a photo with a transparent background is
    not black to training and white to prepare and evaluate."""
    from lorabooth.evaluation.runner import real_images_of
    from lorabooth.photos.imagefiles import decode

    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(2):
        im = Image.new("RGBA", (16, 16), (30, 60, 90, 0))  # transparent, colour underneath
        im.paste((200, 40 * i, 10, 255), (4, 4, 12, 12))  # an opaque subject
        im.save(folder / f"cut_{i}.png")
    trained = load_image(folder / "cut_0.png", 16)
    seen = [decode(folder / "cut_0.png")[0], real_images_of(str(folder))[0]]
    for im in seen:
        pixels = torch.tensor(list(im.getdata()), dtype=torch.float).T.reshape(3, 16, 16)
        assert torch.allclose(trained, pixels / 127.5 - 1.0, atol=1e-6)
    assert torch.equal(trained[:, 0, 0], torch.ones(3))  # white where transparent
    assert torch.allclose(trained[:, 8, 8], torch.tensor([200, 0, 10]) / 127.5 - 1.0)


def test_caption_dropout_picks_at_the_rate_and_is_seeded():
    rates = [caption_dropout(10_000, p, torch.Generator().manual_seed(1)).float().mean().item()
             for p in (0.1, 0.5, 0.9)]
    assert rates[0] == pytest.approx(0.1, abs=0.015) and rates[1] == pytest.approx(0.5, abs=0.02)
    assert rates[2] == pytest.approx(0.9, abs=0.015)
    a = caption_dropout(50, 0.3, torch.Generator().manual_seed(4))
    assert a.dtype == torch.bool and a.shape == (50,)
    assert torch.equal(a, caption_dropout(50, 0.3, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, caption_dropout(50, 0.3, torch.Generator().manual_seed(5)))
    rng = torch.Generator().manual_seed(2)
    state = rng.get_state()
    assert not caption_dropout(5, 0.0, rng).any()  # off: nothing dropped, nothing drawn
    assert torch.equal(rng.get_state(), state)
