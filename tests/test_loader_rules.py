"""The loaders' and the folder oracle's rules on hand-made files: mask thresholds and refusals, how masks and
images are resized, the cache key, mask suffixes, LGG slice order, the default split, and the annotator's
label checks (aspect ratio, the manifest, resizing as the loader does). Each test was written for a mutant of
its rule that the rest of the suite let through (2026-11-27), and was run once against it and failed."""
import os
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import common
import loaders
import oracle
from test_loader_errors import lgg


def test_mask_threshold_is_above_127():
    m = np.zeros((10, 10), np.uint8)
    m[2:8, 2:8], m[0, 0], m[0, 1] = 255, 128, 127
    assert loaders.binarise_mask(m, "m.png")[0, :2].tolist() == [1, 0]


def test_grey_and_label_map_masks_are_refused():
    m = np.zeros((10, 10), np.uint8)
    m[:5] = 255
    m[5:7] = 100                                              # 20 % of the pixels grey: a soft brush, a probability map
    with pytest.raises(loaders.UserError, match=r"m.png: mask is not binary \(20% of pixels between 50 and 205\)"):
        loaders.binarise_mask(m, "m.png")
    m = np.zeros((10, 10), np.uint8)
    m[0, :3] = 110                                            # a label map's class value, not 0/255
    with pytest.raises(loaders.UserError, match=r"m.png: mask values 0..110 are not binary"):
        loaders.binarise_mask(m, "m.png")


def test_palette_and_colour_masks_read_their_object_colour(tmp_path):
    """An annotation tool's mask: palette indices 0/1 (index 1 red or dark blue, 76 and 15 in grey) or a red object
    on black is the object, whatever its grey value; so is a red one with soft edges or a JPEG's noise (every
    pixel a shade of red); a dark mask of two colours is refused, saying so; a grey JPEG mask is read by its grey
    values, as before."""
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 5:20] = 1
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 128))):
        im = Image.fromarray(m, "P")
        im.putpalette([0, 0, 0, *colour] + [0] * 762)
        im.save(tmp_path / name)
        assert loaders.binarise_mask(np.asarray(loaders.read_image(tmp_path / name, "L", mask=True)), name).tolist() \
            == m.tolist(), name
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[m == 1] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert (np.asarray(loaders.read_image(tmp_path / "rgb.png", "L", mask=True)) == m * 255).all()
    big = np.kron(m, np.ones((10, 10), np.uint8))  # 200 x 300: a JPEG's chroma is blurred over 2 px at each edge
    Image.fromarray(np.kron(rgb, np.ones((10, 10, 1), np.uint8))).save(tmp_path / "red.jpg", quality=90)
    soft = Image.fromarray(rgb).resize((1200, 800), Image.NEAREST).resize((300, 200), Image.BILINEAR)
    soft.save(tmp_path / "soft.png")  # a drawing's antialiased edge: a few dark reds
    for name in ("red.jpg", "soft.png"):
        read = np.asarray(loaders.read_image(tmp_path / name, "L", mask=True))
        assert len(np.unique(read)) > 2 and loaders.binarise_mask(read, name).tolist() == big.tolist(), name
    rgb[0:3, 0:3] = (0, 0, 120)  # a second, dark blue class
    Image.fromarray(rgb).save(tmp_path / "two.png")
    voc = np.zeros((100, 100), np.uint8)  # a VOC palette's classes 3 (128, 128, 0) and 1 (128, 0, 0): one of them
    voc[20:70, 20:70], voc[80:85, 80:90] = 3, 1  # a half shade of the other, but not at its edge
    im = Image.fromarray(voc, "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
    im.save(tmp_path / "voc.png")
    for name in ("two.png", "voc.png"):
        with pytest.raises(loaders.UserError, match=name + r": a colour mask with 3 colours; expected one object "
                                                           r"colour on black"):
            loaders.read_image(tmp_path / name, "L", mask=True)
    Image.fromarray(np.repeat(m[..., None] * 255, 3, -1)).save(tmp_path / "grey.jpg", quality=90)
    grey = np.asarray(loaders.read_image(tmp_path / "grey.jpg", "L", mask=True))
    assert 2 < len(np.unique(grey)) and loaders.binarise_mask(grey, "grey.jpg").tolist() == m.tolist()


def test_resize_mask_keeps_half_covered_pixels():
    """Bilinear on 0/255, then >= 128: 33 of 64 columns -> 16 whole output columns and the half-covered 17th."""
    m = np.zeros((64, 64), np.uint8)
    m[:, :33] = 1
    assert loaders.resize_mask(m, 32).sum(1).tolist() == [17] * 32


def test_images_are_resized_by_averaging(tmp_path):
    """Columns alternating 0 / 255 at 64 px average to mid-grey at 32 px (nearest would keep 0 or 255)."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, ::2] = 255
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "masks" / "a.png")
    x = loaders.load_data("folder", str(tmp_path), 32, quiet=True).x
    assert 100 < x.min() and x.max() < 155


@pytest.mark.parametrize("mtime", ["new", "old"])
def test_cache_key_holds_the_modification_and_change_times(tmp_path, capsys, mtime):
    """A mask edited in place to a file of the same size (an uncompressed PNG) is decoded again, not served stale:
    with a new modification time, and with its old one put back (cp -p, rsync -t, unzip over the folder), where
    only the inode's change time moved."""
    if mtime == "old" and sys.platform == "win32":
        pytest.skip("st_ctime is the creation time on Windows")
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    m = np.zeros((16, 16), np.uint8)
    m[2:6, 2:6] = 255
    path = tmp_path / "masks" / "a.png"
    Image.fromarray(m).save(path, compress_level=0)
    before = os.stat(path)
    first = loaders.load_data("folder", str(tmp_path), 16).y
    time.sleep(0.05)  # a change time later than the first's, on file systems that keep whole milliseconds
    Image.fromarray(np.roll(m, 8, 1)).save(path, compress_level=0)
    os.utime(path, ns=(10 ** 18, 10 ** 18) if mtime == "new" else (before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(path) == before.st_size
    assert (os.stat(path).st_mtime_ns == before.st_mtime_ns) == (mtime == "old")
    capsys.readouterr()
    again = loaders.load_data("folder", str(tmp_path), 16)
    assert "decoded" in capsys.readouterr().out and not (again.y == first).all()


def test_every_mask_suffix_pairs(tmp_path):
    os.makedirs(tmp_path / "images"), os.makedirs(tmp_path / "masks")
    m = np.zeros((16, 16), np.uint8)
    m[4:9, 4:9] = 255
    suffixes = ["", "_mask", "_segmentation", "_lesion", "_manual1", "_MASK", "_Segmentation"]  # in any letter case
    for k, suffix in enumerate(suffixes):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "images" / f"case{k}.png")
        Image.fromarray(m).save(tmp_path / "masks" / f"case{k}{suffix}.png")
    d = loaders.load_data("folder", str(tmp_path), 16, quiet=True)
    assert d.ids == [f"case{k}" for k in range(7)] and d.y.reshape(7, -1).any(1).all()


def test_lgg_slices_in_numeric_order(tmp_path):
    d = loaders.load_data("lgg", lgg(tmp_path, 3, slices=12), 16, quiet=True)
    assert [int(i.rsplit("_", 1)[1]) for i in d.ids[:12]] == list(range(1, 13))


def test_default_split_shares():
    """Data without official sets: 20 % test and 16 % validation (the CEAL paper's LGG proportions)."""
    assert loaders.default_split(common.make_synthetic(100, 16)) == [64, 16, 20]
    assert loaders.default_split(common.make_synthetic(50, 16)) == [32, 8, 10]


def folder_data(root, n=3, px=32):
    os.makedirs(root / "images")
    for k in range(n):
        Image.fromarray(np.full((px, px, 3), 90, np.uint8)).save(root / "images" / f"s{k}.png")
    return loaders.load_data("folder", str(root), px, quiet=True)


def test_labels_of_another_aspect_ratio_are_refused(tmp_path):
    """2 % tolerance: 32 x 36 (12 % off) and 33 x 32 (3 %) are refused, 64 x 64 is read."""
    data, lab = folder_data(tmp_path / "data"), tmp_path / "labels"
    os.makedirs(lab)
    for name, (w, h) in (("s0", (36, 32)), ("s1", (32, 33)), ("s2", (64, 64))):
        Image.fromarray(np.zeros((w, h), np.uint8)).save(lab / f"{name}.png")  # array (rows, cols): w rows
    with pytest.raises(loaders.UserError) as e:
        oracle.read_labels(str(lab), ["s0", "s1", "s2"], data, 32)
    assert "another aspect ratio: s0.png is 32x36" in str(e.value) and "s1.png is 33x32" in str(e.value)
    assert "s2.png" not in str(e.value)


def test_labels_are_resized_as_the_loader_resizes_masks(tmp_path):
    data, lab = folder_data(tmp_path / "data", 1), tmp_path / "labels"
    os.makedirs(lab)
    m = np.zeros((64, 64), np.uint8)
    m[:, :33] = 255
    Image.fromarray(m).save(lab / "s0.png")
    got = oracle.read_labels(str(lab), ["s0"], data, 32)[0]
    assert (got == loaders.resize_mask(m // 255, 32)).all() and got.sum(1).tolist() == [17] * 32


def test_a_manifest_of_other_samples_stops_the_run(tmp_path):
    """A round whose to_label manifest lists other samples than the run picks now (the selection did not
    repeat) stops before any label is written into another sample's mask."""
    data = folder_data(tmp_path / "data")
    run = types.SimpleNamespace(args=types.SimpleNamespace(oracle="folder"),
                                path=lambda name: os.path.join(str(tmp_path / "run"), name))
    os.makedirs(run.path("to_label/round_1"))
    with open(run.path("to_label/round_1/manifest.csv"), "w") as f:
        f.write("sample_id\ns2\n")
    y = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(loaders.UserError, match="asks for other samples than this run picks now"):
        oracle.ask(run, 1, np.array([0]), data, y)
    assert not y.any()
