import numpy as np
import pytest
from PIL import Image

from pipeline.files import atomic_path
from pipeline.images import ImageReadError, read_image, to_rgb8, write_image

from .images import rgb, write_odd_files


@pytest.fixture()
def odd(tmp_path):
    return write_odd_files(tmp_path / "odd")


@pytest.mark.parametrize(
    "key,channels,dtype",
    [("plain", 3, np.uint8), ("gray", 1, np.uint8), ("rgba", 4, np.uint8), ("rgb16", 3, np.uint16),
     ("gray16", 1, np.uint16)],
)
def test_read_image_keeps_channels_and_bit_depth(odd, key, channels, dtype):
    array = read_image(odd[key])
    assert array.shape == (80, 96, channels) and array.dtype == dtype


def test_16_bit_colour_is_not_truncated(odd):
    expected = rgb(80, 96).astype(np.uint16) * 257
    assert np.array_equal(read_image(odd["rgb16"]), expected)


@pytest.mark.parametrize("key,reason", [("truncated", "truncated or corrupt"), ("not_image", "not an image")])
def test_unreadable_files_raise_with_path_and_reason(odd, key, reason):
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(odd[key])
    assert info.value.path == str(odd[key])


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("orientation,transform", [
    (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation_is_honoured(tmp_path, orientation, transform):
    image = rgb(40, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    Image.fromarray(image).save(path, exif=exif)
    assert np.array_equal(read_image(path), transform(image))


@pytest.mark.parametrize(
    "key,conversions",
    [("plain", []), ("gray", ["grayscale to RGB"]), ("rgba", ["alpha channel dropped"]),
     ("rgb16", ["16-bit to 8-bit"]), ("gray16", ["16-bit to 8-bit", "grayscale to RGB"])],
)
def test_to_rgb8(odd, key, conversions):
    array, done = to_rgb8(read_image(odd[key]))
    assert array.shape == (80, 96, 3) and array.dtype == np.uint8 and done == conversions


@pytest.mark.parametrize("suffix,channels,dtype", [(".png", 3, np.uint8), (".png", 4, np.uint8),
                                                   (".png", 1, np.uint16), (".png", 3, np.uint16)])
def test_write_then_read_round_trips(tmp_path, suffix, channels, dtype):
    array = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (20, 30, channels), dtype=dtype)
    path = tmp_path / f"out{suffix}"
    write_image(path, array)
    assert np.array_equal(read_image(path), array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_atomic_path_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from pipeline.files import atomic_dir

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inner.txt").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def test_a_killed_write_leaves_no_temp_file_behind_the_next_one(tmp_path):
    """kill -9 during a write leaves `.<name>.<random>.tmp.png`; the next write of that output removes it,
    and touches no other file."""
    from pipeline.files import atomic_dir

    stale = tmp_path / ".out.abcd1234.tmp.png"
    stale.write_bytes(b"partial")
    other = tmp_path / ".out2.abcd1234.tmp.png"
    other.write_bytes(b"another output's")
    stale_dir = tmp_path / ".model.k3j4h5g6.tmp"
    stale_dir.mkdir()
    write_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "weights").write_bytes(b"w")
    assert not stale.exists() and not stale_dir.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out2.abcd1234.tmp.png", "model", "out.png"]
