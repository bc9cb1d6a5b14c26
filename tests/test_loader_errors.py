"""Loader robustness: a damaged or unwritable data cache, images over Pillow's decompression-bomb limit, the
folder layout given one level too deep or with capitalised folder names, and an lgg archive of too few patients.
Small fixtures written to tmp_path; nothing here needs ../shared."""
import glob
import os
import re
import shutil
import time
import warnings

import numpy as np
import pytest
from PIL import Image

import loaders
from conftest import run_script


def folder(root, n=6, px=16, images="images", masks="masks"):
    """images/ + masks/ of n RGB PNGs, each with a square lesion; the folder names may be given."""
    for sub in (images, masks):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n):
        m = np.zeros((px, px), np.uint8)
        m[4:8 + i % 4, 5:11] = 255
        Image.fromarray(np.stack([m // 2 + 40] * 3, -1)).save(os.path.join(root, images, f"img{i}.png"))
        Image.fromarray(m).save(os.path.join(root, masks, f"img{i}_mask.png"))
    return str(root)


def cache_files():
    return sorted(os.listdir(os.environ["ALSEG_CACHE"]))


# ------------------------------------------------------------------------------------------ the cache
@pytest.mark.parametrize("damage", ["cut", "empty", "wrong shape"])
def test_a_damaged_cache_file_is_decoded_again_and_rewritten(tmp_path, capsys, damage):
    root = folder(tmp_path / "data")
    first = loaders.load_data("folder", root, 16, quiet=True)
    [name] = cache_files()
    path = os.path.join(os.environ["ALSEG_CACHE"], name)
    good = open(path, "rb").read()
    if damage == "wrong shape":  # a readable file whose arrays do not fit these samples
        np.savez(path, x=first.x[:2], y=first.y[:2], positive=first.positive[:2])
    else:
        open(path, "wb").write(good[: len(good) // 2] if damage == "cut" else b"")
    capsys.readouterr()
    again = loaders.load_data("folder", root, 16, quiet=True)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"warning: cache file {path} cannot be read (")
    assert out[0].endswith("decoding the data again")
    assert (again.x == first.x).all() and (again.y == first.y).all() and (again.positive == first.positive).all()
    assert open(path, "rb").read() == good and cache_files() == [name]  # rewritten whole
    loaders.load_data("folder", root, 16, quiet=True)
    assert capsys.readouterr().out == ""  # and read from the cache again, without a warning


def test_a_run_stopped_while_writing_the_cache_leaves_no_file(tmp_path, monkeypatch, capsys):
    root = folder(tmp_path / "data")
    real = np.savez

    def cut_short(file, **arrays):  # half a file written, then the run is stopped (Ctrl-C)
        open(file, "wb").write(b"PK\x03\x04" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(loaders.np, "savez", cut_short)
    with pytest.raises(KeyboardInterrupt):
        loaders.load_data("folder", root, 16, quiet=True)
    assert cache_files() == []  # neither a cut cache file nor the temporary one

    def disk_full(file, **arrays):
        open(file, "wb").write(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loaders.np, "savez", disk_full)
    d = loaders.load_data("folder", root, 16)  # the data is decoded: the run goes on, uncached
    out = capsys.readouterr().out
    assert len(d) == 6 and cache_files() == []
    assert "warning: cache file " in out and "not written (No space left on device)" in out and "not cached" in out
    monkeypatch.setattr(loaders.np, "savez", real)
    loaders.load_data("folder", root, 16, quiet=True)
    assert len(cache_files()) == 1


def test_a_temporary_file_left_by_a_killed_run_is_removed_when_an_hour_old(tmp_path):
    root = folder(tmp_path / "data")
    loaders.load_data("folder", root, 16, quiet=True)
    [name] = cache_files()
    path = os.path.join(os.environ["ALSEG_CACHE"], name)
    os.remove(path)  # as after a run killed (SIGKILL) while writing: no cache file, its temporary ones left
    stale, young, other = path + ".tmp111.npz", path + ".tmp222.npz", path[:-4] + "0.npz.tmp333.npz"
    for f in (stale, young, other):
        open(f, "wb").write(b"PK")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    loaders.load_data("folder", root, 16, quiet=True)
    # the hour-old one goes; a young one may be another run writing now; another cache key's is not touched
    assert cache_files() == sorted([name, os.path.basename(young), os.path.basename(other)])


def test_an_unusable_cache_folder_stops_before_decoding(tmp_path, monkeypatch):
    root = folder(tmp_path / "data")
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(loaders, "_decode", lambda *a: pytest.fail("decoded before checking the cache folder"))
    for cache, why in ((tmp_path / "afile", "is a file, not a folder"),
                       (tmp_path / "afile" / "sub", "the cache folder cannot be created (Not a directory)")):
        monkeypatch.setenv("ALSEG_CACHE", str(cache))
        with pytest.raises(loaders.UserError, match=re.escape(f"{cache}: {why}; set $ALSEG_CACHE to a writable")):
            loaders.load_data("folder", root, 16, quiet=True)


def test_an_unusable_cache_folder_is_one_line_and_exit_2(tmp_path):
    root = folder(tmp_path / "data", n=24)
    (tmp_path / "afile").write_text("")
    out = run_script("example_tta.py", "--data", "folder", "--data-dir", root, "--image-size", 32, "--width", 4,
                     "--rounds", 1, "--epochs-initial", 1, "--epochs", 1, "--split", 14, 4, 6, "--initial", 4,
                     "--query", 2, "--out", tmp_path / "runs", check=False,
                     env_extra={"ALSEG_CACHE": str(tmp_path / "afile")})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'afile'}: is a file, not a folder; set "
                                               f"$ALSEG_CACHE to a writable folder for the data cache"]


# ------------------------------------------------------------------------------------------ large images
@pytest.mark.parametrize("side", [10000, 14000])  # 100 Mpx: Pillow's warning; 196 Mpx: its error
def test_images_over_pillows_bomb_limit_load_without_a_warning(tmp_path, side):
    path = str(tmp_path / "scan.jpg")
    Image.new("L", (side, side), 90).save(path)  # a JPEG: read at 1/8 scale (draft), so the test stays fast
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        im, stored = loaders.read_image(path, "RGB", 32, with_size=True)
    assert stored == (side, side) and im.mode == "RGB" and np.asarray(im).max() in (89, 90, 91)


# ------------------------------------------------------------------------------------------ folder layout
def test_the_images_folder_given_points_at_its_parent(tmp_path):
    root = folder(tmp_path / "data")
    for sub in ("images", "masks"):
        with pytest.raises(loaders.UserError, match=re.escape(f"{os.path.join(root, sub)} is itself the {sub} folder: "
                                                              f"point --data-dir at its parent {root}")):
            loaders.load_data("folder", os.path.join(root, sub) + os.sep, 16, quiet=True)
    with pytest.raises(loaders.UserError, match=r"expected images/ and masks/.* \(found: \['data'\]\); the layout is "
                                                + re.escape(f"one folder down: --data-dir {root}?") + "$"):
        loaders.load_data("folder", str(tmp_path), 16, quiet=True)


def test_a_file_for_a_folder_and_a_mask_among_the_images_are_named_as_such(tmp_path):
    root = folder(tmp_path / "data")
    with pytest.raises(loaders.UserError, match=re.escape(f"--data-dir {root}/images/img0.png: a file, not a folder; "
                                                          "expected the folder of the folder archive")):
        loaders.load_data("folder", os.path.join(root, "images", "img0.png"), 16, quiet=True)
    for sub in ("images", "masks"):
        for name in (sub, sub.capitalize()):  # Images: the folder's name is read in any case, so is the file's
            os.rename(os.path.join(root, sub), os.path.join(root, "x"))
            open(os.path.join(root, name), "w").close()
            with pytest.raises(loaders.UserError, match=re.escape(f"{root}/{name}: a file, not a folder; expected "
                                                                  f"the folder of the {sub}")):
                loaders.load_data("folder", root, 16, quiet=True)
            os.remove(os.path.join(root, name))
            os.rename(os.path.join(root, "x"), os.path.join(root, sub))
    shutil.copy(os.path.join(root, "masks", "img3_mask.png"), os.path.join(root, "images"))  # a mask in images/
    with pytest.raises(loaders.UserError, match=re.escape(f"{root}/images/img3_mask.png: a mask among the images? its "
                                                          f"name adds a mask suffix to the image {root}/images/img3.png; "
                                                          f"expected masks in {root}/masks (1 such file(s))")):
        loaders.load_data("folder", root, 16, quiet=True)
    # but an image whose name ends in a mask suffix and is not a copy of the mask of that name is an image (Kvasir's
    # p0_lesion.png convention): img3.png and img3_lesion.png, each with its own mask
    os.remove(os.path.join(root, "images", "img3_mask.png"))
    for sub in ("images", "masks"):
        src = os.path.join(root, sub, "img3.png" if sub == "images" else "img3_mask.png")
        shutil.copy(src, os.path.join(root, sub, "img3_lesion.png"))
    assert "img3_lesion" in loaders.load_data("folder", root, 16, quiet=True).ids
    # a mask moved (not copied) among the images: neither it nor img5 has a mask, and it holds two values
    shutil.move(os.path.join(root, "masks", "img5_mask.png"), os.path.join(root, "images"))
    with pytest.raises(loaders.UserError, match=re.escape(f"{root}/images/img5_mask.png: a mask among the images? its "
                                                          f"name adds a mask suffix to the image {root}/images/img5.png, "
                                                          f"which has no mask, and it holds two values at most; expected "
                                                          f"masks in {root}/masks (1 such file(s))")):
        loaders.load_data("folder", root, 16, quiet=True)
    # a photo so named is two images to label (split_data names them), not a mask
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(os.path.join(root, "images", "img5_mask.png"))
    d = loaders.load_data("folder", root, 16, quiet=True)
    assert [d.ids[i] for i in d.official["unlabelled"]] == ["img5", "img5_mask"]


@pytest.mark.parametrize("names", [("Images", "Masks"), ("IMAGES", "masks"), ("images", "Masks")])
def test_folder_names_in_any_case_are_read(tmp_path, names):
    ref = loaders.load_data("folder", folder(tmp_path / "ref"), 16, quiet=True)
    d = loaders.load_data("folder", folder(tmp_path / "data", images=names[0], masks=names[1]), 16, quiet=True)
    assert d.official == {}  # every image paired with its mask (none taken for an image to label)
    assert d.ids == ref.ids and (d.x == ref.x).all() and (d.y == ref.y).all()


def test_two_images_folders_differing_in_case_are_an_error(tmp_path):
    root = folder(tmp_path / "data")
    try:
        os.mkdir(os.path.join(root, "Images"))
    except FileExistsError:
        pytest.skip("case-insensitive file system")
    with pytest.raises(loaders.UserError, match=re.escape(f"{root}: found Images/, images/: keep one images/ folder")):
        loaders.load_data("folder", root, 16, quiet=True)


# ------------------------------------------------------------------------------------------ lgg patients
def lgg(root, patients, slices=3, px=16):
    """kaggle_3m/TCGA_XX_<p>_19990101/TCGA_XX_<p>_19990101_<s>.tif + _mask.tif, a tumour on every slice."""
    for p in range(patients):
        d = os.path.join(root, "kaggle_3m", f"TCGA_XX_{1000 + p}_19990101")
        os.makedirs(d)
        for s in range(1, slices + 1):
            m = np.zeros((px, px), np.uint8)
            m[4:9, 4:9] = 255
            Image.fromarray(np.stack([m // 2 + 30] * 3, -1)).save(os.path.join(d, f"{os.path.basename(d)}_{s}.tif"))
            Image.fromarray(m).save(os.path.join(d, f"{os.path.basename(d)}_{s}_mask.tif"))
    return str(root)


def test_lgg_with_too_few_patients_says_how_many_are_needed(tmp_path):
    d = loaders.load_data("lgg", lgg(tmp_path / "two", 2), 16, quiet=True)
    with pytest.raises(loaders.UserError, match=r"no patient left for the training set .*; the split is by patient, "
                                                r"so the 3 sets asked for need at least 3 patients; 2 found$"):
        loaders.make_splits(d, (2, 1, 1), 0)
    assert [len(s) for s in loaders.make_splits(d, (3, 0, 3), 0)] == [3, 0, 3]  # two sets: two patients do
    d = loaders.load_data("lgg", lgg(tmp_path / "four", 4), 16, quiet=True)
    with pytest.raises(loaders.UserError, match=r"no patient left for the training set .*; lower --split$"):
        loaders.make_splits(d, (3, 3, 9), 0)  # enough patients, sizes too large: lowering --split helps


# ------------------------------------------------------------------------------------------ folder names
def test_a_folder_name_with_glob_characters_is_read_as_written(tmp_path):
    """set[12]/ beside set1/: a [ in a folder's name is a character, not a pattern (glob.escape). Before,
    --data-dir set[12] silently read set1/'s images; an lgg archive and collect.py's runs[1]/ the same."""
    ref = loaders.load_data("folder", folder(tmp_path / "ref", n=5), 16, quiet=True)
    folder(tmp_path / "set1", n=9)
    d = loaders.load_data("folder", folder(tmp_path / "set[12]", n=5), 16, quiet=True)
    assert d.ids == ref.ids and (d.x == ref.x).all()
    lgg(tmp_path / "p1", 4)
    assert len(loaders.load_data("lgg", lgg(tmp_path / "p[12]", 3), 16, quiet=True).ids) == 9  # 3 patients x 3
    import tables
    for name, seed in (("runs1", 0), ("runs[12]", 1)):
        os.makedirs(tmp_path / name / "r")
        (tmp_path / name / "r" / "config.json").write_text(f'{{"script": "x", "args": {{"seed": {seed}}}}}')
        (tmp_path / name / "r" / "rounds.csv").write_text("round,labeled,dice_mean\n0,10,0.5\n")
    assert [r["seed"] for r in tables.collect_runs([str(tmp_path / "runs[12]")])] == [1]


def test_extensions_in_any_case_hidden_files_and_non_regular_files(tmp_path):
    """a.Jpg is an image as a.jpg and a.JPG are (before: "no files found"); macOS's ._a.png beside it is not
    read; a folder or a pipe named like an image is one line naming it (a pipe blocked the run for ever)."""
    ref = loaders.load_data("folder", folder(tmp_path / "ref"), 16, quiet=True)
    root = folder(tmp_path / "mixed")
    for i in range(6):
        for sub, name in (("images", f"img{i}.png"), ("masks", f"img{i}_mask.png")):
            os.rename(os.path.join(root, sub, name), os.path.join(root, sub, name.replace(".png", ".Png")))
    (tmp_path / "mixed" / "images" / "._img0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata
    d = loaders.load_data("folder", root, 16, quiet=True)
    assert d.ids == ref.ids and (d.x == ref.x).all() and (d.y == ref.y).all()
    root = folder(tmp_path / "dir")
    os.mkdir(os.path.join(root, "images", "zz.png"))
    with pytest.raises(loaders.UserError, match=re.escape(f"{os.path.join(root, 'images', 'zz.png')}: not a regular "
                                                          "file (a folder, a pipe or a device); expected an image")):
        loaders.load_data("folder", root, 16, quiet=True)
    if not hasattr(os, "mkfifo"):
        return
    root = folder(tmp_path / "pipe", n=24)
    os.mkfifo(os.path.join(root, "images", "zz.png"))
    out = run_script("example_tta.py", "--data", "folder", "--data-dir", root, "--image-size", 32, "--out",
                     tmp_path / "runs", check=False, timeout=120)
    assert out.returncode == 2 and out.stderr == f"error: {os.path.join(root, 'images', 'zz.png')}: not a regular " \
        "file (a folder, a pipe or a device); expected an image file\n", out.stderr


def test_a_mask_drawn_on_the_exif_turned_view_is_named_as_such(tmp_path, capsys):
    """Images are read as stored (no EXIF orientation applied, as the official datasets' masks are made); a mask
    of swapped size beside an image whose EXIF tag turns it 90 degrees gets that reason in its error line, and
    square images with the tag (where a mask of the turned view passes every check) get a note line."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    root = folder(tmp_path / "square")
    for i in (0, 3):
        path = os.path.join(root, "images", f"img{i}.png")
        Image.open(path).save(path.replace(".png", ".jpg"), exif=exif)
        os.remove(path)
    note = (f"note: 2 images carry an EXIF orientation tag (e.g. {root}/images/img0.jpg): they are read as stored, "
            "not turned as a viewer shows them, so their masks must match the stored pixels\n")
    loaders.load_data("folder", root, 16, quiet=True)
    assert capsys.readouterr().out == note
    loaders.load_data("folder", root, 16, quiet=True)  # from the cache: said again, every run
    assert capsys.readouterr().out == note
    (cache,) = glob.glob(os.path.join(loaders.cache_dir(), "folder-16px-3ch-*.npz"))
    with np.load(cache) as z:  # a cache written before the tag was kept: decoded again, once, and said
        np.savez(cache, x=z["x"], y=z["y"], positive=z["positive"])
    loaders.load_data("folder", root, 16, quiet=True)
    assert capsys.readouterr().out == note and "turned" in np.load(cache).files
    root, upright = folder(tmp_path / "upright"), Image.Exif()
    upright[0x0112] = 1  # shown as stored: no note
    Image.open(os.path.join(root, "images", "img0.png")).save(os.path.join(root, "images", "img0.jpg"), exif=upright)
    os.remove(os.path.join(root, "images", "img0.png"))
    loaders.load_data("folder", root, 16, quiet=True)
    assert capsys.readouterr().out == ""
    root = folder(tmp_path / "exif")
    Image.new("RGB", (24, 16), (90, 90, 90)).save(os.path.join(root, "images", "img0.jpg"), exif=exif)
    os.remove(os.path.join(root, "images", "img0.png"))
    Image.fromarray(np.full((24, 16), 255, np.uint8)).save(os.path.join(root, "masks", "img0_mask.png"))
    with pytest.raises(loaders.UserError, match=r"img0.jpg is 24x16 but its mask .*img0_mask.png is 16x24: .*a "
                                                r"mispaired file\? Or the mask follows the image as a viewer turns it "
                                                r"by its EXIF orientation tag"):
        loaders.load_data("folder", root, 16, quiet=True)


def test_names_that_end_in_a_mask_suffix_or_differ_in_unicode_form_pair(tmp_path):
    """An image p0_lesion.png whose mask has its very name (Kvasir-SEG's convention) pairs with it (before: "mask
    without an image", _lesion being a mask suffix); café.png pairs with a mask named in the decomposed form
    macOS writes (e + U+0301), and its id is the composed name."""
    import unicodedata
    ref = loaders.load_data("folder", folder(tmp_path / "ref"), 16, quiet=True)
    for case, image, mask in (("suffix", "img{}_lesion.png", "img{}_lesion.png"),
                              ("nfd", "caf\u00e9{}.png", unicodedata.normalize("NFD", "caf\u00e9{}_mask.png"))):
        root = folder(tmp_path / case)
        for i in range(6):
            os.rename(os.path.join(root, "images", f"img{i}.png"), os.path.join(root, "images", image.format(i)))
            os.rename(os.path.join(root, "masks", f"img{i}_mask.png"), os.path.join(root, "masks", mask.format(i)))
        d = loaders.load_data("folder", root, 16, quiet=True)
        assert d.official == {} and (d.x == ref.x).all() and (d.y == ref.y).all(), case  # every image paired
        assert d.ids == [os.path.splitext(image.format(i))[0] for i in range(6)]
