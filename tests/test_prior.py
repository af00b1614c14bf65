from PIL import Image

from lorabooth.models import build_tiny, pipeline_from_parts
from lorabooth.prior import class_image_name, draw_class_images, missing_indices


def _pipe():
    pipe = pipeline_from_parts(build_tiny())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_missing_indices_fill_the_gaps(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(1))
    Image.new("RGB", (8, 8)).save(tmp_path / "users_own.jpg")
    (tmp_path / class_image_name(0)).write_bytes(b"broken")  # unreadable: does not count
    assert missing_indices(tmp_path, 4) == [0, 2]
    assert missing_indices(tmp_path, 2) == []


def test_draws_the_count_at_the_resolution_and_reuses(tmp_path):
    pipe = _pipe()
    folder = tmp_path / "cls"
    n = draw_class_images(pipe, folder, "a photo of a dog", missing_indices(folder, 3),
                          resolution=32, seed=0, steps=2, batch=2, progress=False)
    assert n == 3
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [class_image_name(i) for i in range(3)]
    assert all(Image.open(f).size == (32, 32) for f in files)
    before = {f: f.stat().st_mtime_ns for f in files}
    # a second fill for more images draws only the missing one
    assert missing_indices(folder, 4) == [3]
    assert draw_class_images(pipe, folder, "a dog", missing_indices(folder, 4), 32, 0, 2, 2) == 1
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    assert len(list(folder.glob("*.png"))) == 4


def test_image_i_comes_from_seed_plus_i_whatever_the_batching(tmp_path):
    pipe = _pipe()
    draw_class_images(pipe, tmp_path / "a", "a dog", [0, 1, 2], 32, 7, 2, batch=3, progress=False)
    draw_class_images(pipe, tmp_path / "b", "a dog", [2, 0, 1], 32, 7, 2, batch=1, progress=False)
    for i in range(3):
        a = Image.open(tmp_path / "a" / class_image_name(i)).tobytes()
        b = Image.open(tmp_path / "b" / class_image_name(i)).tobytes()
        assert a == b


def test_stale_temp_files_are_removed_and_not_counted(tmp_path):
    from lorabooth.prior import remove_stale_temps

    Image.new("RGB", (8, 8)).save(tmp_path / class_image_name(0))
    (tmp_path / ".class_00001.png.abc.tmp").write_bytes(b"half written")
    assert missing_indices(tmp_path, 2) == [1]
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [class_image_name(0)]
