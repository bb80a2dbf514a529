"""Loading and validation of inputs: modes, EXIF, bad files, input expansion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cem.io import ImageLoadError, expand_inputs, load_image


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_modes_normalised_to_rgb(tmp_path, astronaut, mode):
    im = Image.fromarray(astronaut)
    if mode == "I;16":
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
        im = Image.fromarray(arr)
    else:
        im = im.convert(mode)
    ext = "tif" if mode in ("CMYK",) else "png"
    p = _save(tmp_path, f"x.{ext}", im)
    rgb = load_image(p)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert 20 < rgb.mean() < 235  # not black or white: the values were converted, not clipped


def test_16bit_keeps_full_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (16, 1))
    p = _save(tmp_path, "ramp.png", Image.fromarray(ramp))
    rgb = load_image(p)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    rgb = load_image(_save(tmp_path, "t.png", Image.fromarray(a)))
    assert (rgb == 255).all()


def test_exif_orientation_applied(tmp_path, astronaut):
    im = Image.fromarray(astronaut[:, :400])  # 400 wide, 512 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewer must rotate 90° clockwise
    stored = im.transpose(Image.Transpose.ROTATE_90)
    p = tmp_path / "rot.jpg"
    stored.save(p, exif=exif.tobytes(), quality=95)
    rgb = load_image(p)
    assert rgb.shape[:2] == (512, 400)
    assert np.abs(rgb.astype(int) - astronaut[:, :400].astype(int)).mean() < 6


@pytest.mark.parametrize(
    "content,expected",
    [(b"", "empty file"), (b"hello, I am text", "not an image"), (None, "corrupt or truncated")],
)
def test_bad_files_raise_clear_errors(tmp_path, astronaut, content, expected):
    p = tmp_path / "bad.jpg"
    if content is None:  # a real JPEG cut in half
        good = _save(tmp_path, "good.jpg", Image.fromarray(astronaut))
        content = good.read_bytes()[: good.stat().st_size // 2]
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match=expected) as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_decompression_bomb_refused(tmp_path):
    p = _save(tmp_path, "big.png", Image.new("L", (300, 300)))
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(p, max_pixels=10_000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_expand_inputs_folders_globs_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for n in ["a/1.jpg", "a/b/2.PNG", "a/notes.txt", "3.jpeg"]:
        (tmp_path / n).write_bytes(b"x")
    got = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.jpeg"), str(tmp_path / "a" / "notes.txt")])
    assert got == [str(tmp_path / "a" / "1.jpg"), str(tmp_path / "a" / "b" / "2.PNG"), str(tmp_path / "3.jpeg"),
                   str(tmp_path / "a" / "notes.txt")]


def test_links_to_folders_are_followed_once_each_without_looping(tmp_path):
    """A folder of linked subsets (`linked_trip -> ../exif`) was annotated without them and without a word."""
    import os

    (tmp_path / "album" / "sub").mkdir(parents=True)
    (tmp_path / "trip").mkdir()
    for n in ["album/own.jpg", "album/sub/s.jpg", "trip/x.jpg"]:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "album" / "linked_trip").symlink_to("../trip")
    (tmp_path / "album" / "sub" / "up").symlink_to("..")  # back up the tree: a loop
    (tmp_path / "album" / "a_link").symlink_to("sub")  # a folder reached two ways: walked once, by its own name
    (tmp_path / "album" / "z_link").symlink_to("sub")
    (tmp_path / "album" / "dangling").symlink_to("nowhere")
    (tmp_path / "secret").mkdir()  # beside the album: a link up the tree must not reach it
    (tmp_path / "secret" / "s.jpg").write_bytes(b"x")
    (tmp_path / "album" / "parent").symlink_to("..")
    got = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path / "album")])]
    assert sorted(got) == ["album/linked_trip/x.jpg", "album/own.jpg", "album/sub/s.jpg"]


def test_long_manifest_fields_read_without_raising_the_process_wide_csv_limit(tmp_path):
    import csv

    from cem.io import read_context_csv, read_manifest

    long_context = "y" * 150_000  # beyond the csv module's default limit of 128 KiB
    man = tmp_path / "m.csv"
    man.write_text(f"image,context\na.png,{long_context}\n", encoding="utf-8")
    before = csv.field_size_limit()
    (item,) = read_manifest(man)
    assert "150000 characters" in (item.error or "")  # read in full (then refused as a context), not a csv error
    assert read_context_csv(man).errors  # same for a context file
    # the limit is cem's only while it reads: a user's own csv code (and `cem eval`) keep theirs
    assert csv.field_size_limit() == before
    with open(man, encoding="utf-8") as fh, pytest.raises(csv.Error):
        list(csv.reader(fh))


def test_an_array_and_the_same_pil_image_load_alike(astronaut):
    """Transparency and 16-bit values follow one rule for arrays and PIL images: a transparent RGBA array is
    white (its alpha was dropped, so a transparent face was found in the array and not in the PIL image),
    and 16-bit values within 0-255 are 8-bit values in both (the array was divided by 257, to black)."""
    rgba = np.dstack([astronaut, np.zeros(astronaut.shape[:2], np.uint8)])
    assert (load_image(rgba) == 255).all()
    assert (load_image(rgba) == load_image(Image.fromarray(rgba))).all()
    half = np.dstack([astronaut, np.full(astronaut.shape[:2], 128, np.uint8)])
    assert np.abs(load_image(half).astype(int) - load_image(Image.fromarray(half)).astype(int)).max() <= 1
    low16 = np.asarray(Image.fromarray(astronaut).convert("L"), dtype=np.uint16)  # values 0-255 in 16 bits
    assert (load_image(low16) == load_image(Image.fromarray(low16))).all() and load_image(low16).mean() > 20
    full16 = low16 * 257
    assert (load_image(full16) == load_image(Image.fromarray(full16))).all()


def test_16_bit_images_are_scaled_by_the_bit_depth_their_values_use(astronaut, tmp_path):
    """One pixel at 256 in 8-bit values turned the whole picture black (divided by 257: no face, no error),
    and 12-bit camera data in a 16-bit file was read at 6 % brightness: values are scaled from the smallest
    2**k - 1 at or above their largest, in files, PIL images and arrays alike."""
    gray = np.asarray(Image.fromarray(astronaut).convert("L"), dtype=np.uint16)
    eight = load_image(gray)
    outlier = gray.copy()
    outlier[0, 0] = 256
    for arr, want in [(outlier, (eight.astype(float) * 255 / 511)),  # 9 bits: half as bright, not black
                      (gray * 16, eight.astype(float) * 16 * 255 / 4095),  # 12-bit data: full brightness
                      (gray * 257, eight.astype(float))]:
        path = tmp_path / "x.png"
        Image.fromarray(arr).save(path)
        with Image.open(path) as im:
            assert im.mode.startswith("I")
        for got in (load_image(arr), load_image(str(path)), load_image(Image.fromarray(arr))):
            assert np.abs(got[1:, 1:].astype(float) - want[1:, 1:]).max() <= 1.0  # (the pixel at 0, 0 aside)
    assert load_image(outlier).mean() > 0.4 * eight.mean()
    assert load_image(gray * 16).mean() > 0.95 * eight.mean()


def test_an_image_in_a_folder_and_a_manifest_row_is_one_input_and_a_note_says_so(tmp_path):
    from cem.io import collect_inputs

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,context,rater\n{folder / 'a.png'},,r1\n")
    got = collect_inputs([str(folder), str(manifest)])
    assert sorted((it.path.rsplit("/", 1)[-1], it.extra) for it in got.items) == [
        ("a.png", {"rater": "r1"}), ("b.png", {})]
    assert any("named both plainly" in n and n.startswith("1 image(s)") for n in got.notes), got.notes


def test_a_context_row_by_file_name_that_several_inputs_share_is_refused(tmp_path):
    """`dup/a/img.jpg` and `dup/b/img.jpg` both took one `img.jpg` row's context, unsaid."""
    from cem.io import InputError, collect_inputs, read_context_csv

    for sub in ("a", "b"):
        (tmp_path / "dup" / sub).mkdir(parents=True)
        (tmp_path / "dup" / sub / "img.jpg").write_bytes(b"x")
    ctx = tmp_path / "ctx.csv"
    ctx.write_text("image,context\nimg.jpg,at a funeral\n")
    with pytest.raises(InputError, match=r"'img.jpg' names a file name that 2 inputs share .*give each its path"):
        collect_inputs([str(tmp_path / "dup")], read_context_csv(ctx))
    # by path it is one image's; a file name that one input has still works
    a = str(tmp_path / "dup" / "a" / "img.jpg")
    ctx.write_text(f"image,context\n{a},at a funeral\n")
    got = {it.path: it.context for it in collect_inputs([str(tmp_path / "dup")], read_context_csv(ctx)).items}
    assert got == {a: "at a funeral", str(tmp_path / "dup" / "b" / "img.jpg"): None}
    ctx.write_text("image,context\nimg.jpg,at a funeral\n")
    got = {it.path: it.context for it in collect_inputs([a], read_context_csv(ctx)).items}
    assert got == {a: "at a funeral"}


def test_a_path_through_a_link_and_up_keeps_its_parent_part(tmp_path):
    """Removing `link/..` as text named another file (`sl/x.png`, not found) when `link` points elsewhere."""
    import os

    from cem.io import collect_inputs

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "x.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    given = f"{tmp_path}/./link/../x.png"
    [item] = collect_inputs([given]).items
    assert item.path == f"{tmp_path}/link/../x.png" and os.path.isfile(item.path)
