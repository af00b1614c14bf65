import torch
from PIL import Image

from lorabooth.data import Shuffler, load_image, readable_images


def test_readable_images_skips_non_images(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in readable_images(tmp_path)] == ["a.png"]


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
