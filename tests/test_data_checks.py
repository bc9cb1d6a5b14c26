"""Data checks (issue 12, parts 1 and 5): the LGG split by whole patients with the sizes it achieves, tumour
slices decided at full resolution (kept at every --image-size), and bad data that used to run silently
(every training mask empty, an image and its mask of different sizes)."""
import csv
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

import ceal_mcdropout
import common
import loaders
from conftest import REAL, run_dir_from, run_script

PAPER_LGG = (878, 220, 275)  # CEAL Table 2: 1373 slices with tumour


def lgg_archive(root, n_patients=40, n_positive=1373, px=64, seed=12):
    """A kaggle_3m layout: TCGA_<site>_<id>_<date>/TCGA_..._<slice>.tif (RGB) + ..._<slice>_mask.tif (0/255),
    uneven slice counts, a few tumour-free slices at both ends of each patient, exactly `n_positive` slices
    with tumour, and every 15th of those a one-pixel tumour that vanishes when 64 px go to 32 or 16.
    Returns the ids of the one-pixel slices."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(8, 64, n_patients).astype(float)
    pos = np.round(raw / raw.sum() * n_positive).astype(int)
    pos[np.argmax(pos)] += n_positive - pos.sum()
    neg = rng.integers(0, 4, n_patients)
    base = np.linspace(40, 200, px, dtype=np.float32)[None].repeat(px, 0)
    yy, xx = np.mgrid[:px, :px]
    tiny, k = [], 0
    for p in range(n_patients):
        name = f"TCGA_{('CS', 'DU', 'HT', 'FG')[p % 4]}_{4000 + 37 * p}_{19950101 + p}"
        d = os.path.join(root, "kaggle_3m", name)
        os.makedirs(d)
        for s in range(1, pos[p] + neg[p] + 1):
            m = np.zeros((px, px), np.uint8)
            if neg[p] // 2 < s <= neg[p] // 2 + pos[p]:
                k += 1
                if k % 15 == 0:
                    m[2 * (k % 20) + 11, 2 * (k % 17) + 13] = 255
                    tiny.append(f"{name}_{s}")
                else:
                    r, cy, cx = rng.uniform(4, 12), *rng.uniform(16, px - 16, 2)
                    m[np.hypot(yy - cy, xx - cx) < r] = 255
            img = np.clip(base + 0.3 * m, 0, 255).astype(np.uint8)
            Image.fromarray(np.stack([img] * 3, -1)).save(os.path.join(d, f"{name}_{s}.tif"))
            Image.fromarray(m).save(os.path.join(d, f"{name}_{s}_mask.tif"))
    return tiny


@pytest.fixture(scope="module")
def lgg(tmp_path_factory):
    """The archive (written once, ~3 s) and one cache shared by this module's tests: decoded once per size."""
    root = tmp_path_factory.mktemp("lgg")
    tiny = lgg_archive(str(root))
    return types.SimpleNamespace(root=str(root), tiny=tiny, cache=str(tmp_path_factory.mktemp("lgg-cache")))


def patient(sample_id):
    return "_".join(sample_id.split("_")[:3])


# ------------------------------------------------------------------------------------- split by patient
def grouped(sizes):
    """Data of patients P0, P1, ... with the given numbers of samples (all with foreground)."""
    groups = np.repeat([f"P{g}" for g in range(len(sizes))], sizes)
    n = len(groups)
    y = np.ones((n, 4, 4), np.uint8)
    return common.Data(np.zeros((n, 1, 4, 4), np.uint8), y, [f"s{i}" for i in range(n)], {}, groups, "grouped")


def test_patient_split_rule_by_hand():
    # Ten patients of 10: test 25 takes two (20; a third would give 30, no closer: a tie stays out),
    # validation 15 takes one (10; 20 is no closer); 60 + 15 + 25 = all the data, so training gets the 70 left.
    d = grouped([10] * 10)
    tr, va, te = common.make_splits(d, (60, 15, 25), seed=0)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    # The same request on fewer than all the data: training gets the requested 30 of the 70 left.
    tr, va, te = common.make_splits(d, (30, 15, 25), seed=0)
    assert (len(tr), len(va), len(te)) == (30, 10, 20)
    # A patient that would overshoot is skipped, not the end, whatever the shuffled order: test 6 gets the
    # three patients of 2 (A 20 and E 30 skipped); validation 10: no patient brings it closer, so the
    # smallest free one (A, 20); training 1 of E's.
    d = grouped([20, 2, 2, 2, 30])
    for seed in range(5):
        tr, va, te = common.make_splits(d, (1, 10, 6), seed=seed)
        assert set(d.groups[te]) == {"P1", "P2", "P3"} and set(d.groups[va]) == {"P0"}
        assert len(tr) == 1 and set(d.groups[tr]) == {"P4"}


def test_patient_split_seeded_disjoint_and_close():
    rng = np.random.default_rng(0)
    d = grouped(rng.integers(3, 9, 40))  # about 220 samples: training gets the 100 asked for
    for seed in range(4):
        tr, va, te = common.make_splits(d, (100, 30, 40), seed=seed)
        sides = [set(d.groups[s]) for s in (tr, va, te)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert abs(len(va) - 30) <= 4 and abs(len(te) - 40) <= 4  # within half of the largest patient (8)
        assert len(tr) == 100
    again, other = common.make_splits(d, (100, 30, 40), 3), common.make_splits(d, (100, 30, 40), 2)
    assert all((a == b).all() for a, b in zip((tr, va, te), again)) and set(te) != set(other[2])


def test_impossible_patient_split_is_an_error():
    with pytest.raises(common.UserError, match="no patient left for the validation set"):
        common.make_splits(grouped([5, 5]), (1, 5, 10), 0)     # test takes both patients
    with pytest.raises(common.UserError, match="no patient left for the training set"):
        common.make_splits(grouped([5, 5]), (1, 5, 5), 0)
    tr, va, te = common.make_splits(grouped([5, 5]), (5, 0, 5), 0)  # an empty set asked for is fine
    assert (len(tr), len(va), len(te)) == (5, 0, 5)


def test_lgg_fixture_tumour_slices_at_every_size_and_paper_split(lgg, monkeypatch):
    monkeypatch.setenv("ALSEG_CACHE", lgg.cache)
    for size in (16, 32):
        d = common.load_data("lgg", lgg.root, size, quiet=True)
        assert len(d) > 1373 and d.positive.sum() == 1373
        pos = ceal_mcdropout.keep_positive(d)
        assert len(pos) == 1373 and set(lgg.tiny) <= set(pos.ids)  # the one-pixel tumours are kept ...
        vanished = {pos.ids[i] for i in np.flatnonzero(~pos.y.reshape(len(pos), -1).any(1))}
        assert vanished == set(lgg.tiny)  # ... though resizing wiped them out (so this test can fail)
    tr, va, te = common.make_splits(pos, PAPER_LGG, seed=0)
    sides = [set(pos.groups[s]) for s in (tr, va, te)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert len(tr) + len(va) + len(te) == 1373 and abs(len(va) - 220) < 32 and abs(len(te) - 275) < 32
    common.check_budget(len(tr), 329, 35, 10)  # the paper's oracle budget (Table 2: 329 + 35 x 10) fits


def test_ceal_paper_lgg_protocol_on_fixture(lgg, tmp_path):
    """The paper's LGG command (878 / 220 / 275, --initial 329) runs past the split on a many-patient archive;
    the achieved sizes are printed and recorded; check_budget passes on the achieved training set."""
    out = run_script("ceal_mcdropout.py", "--data", "lgg", "--data-dir", os.path.join(lgg.root, "kaggle_3m"),
                     "--image-size", 32, "--width", 4, "--epochs-initial", 1, "--epochs", 1, "--rounds", 1,
                     "--mc-passes", 2, "--batch-size", 64, "--out", tmp_path,
                     # one thread: as fast for a width-4 net at 32 px, and no OpenMP spinning on a loaded machine
                     env_extra={"ALSEG_CACHE": lgg.cache, "OMP_NUM_THREADS": "1"})
    run = run_dir_from(out)
    cfg = json.load(open(os.path.join(run, "config.json")))
    splits = json.load(open(os.path.join(run, "splits.json")))
    achieved = [len(splits[k]) for k in ("train", "val", "test")]
    assert cfg["args"]["split"] == list(PAPER_LGG) and cfg["split_achieved"] == achieved and sum(achieved) == 1373
    line = [s for s in out.stdout.splitlines() if s.startswith("split by patient:")]
    assert line == [f"split by patient: requested train 878 / val 220 / test 275, achieved {achieved[0]} / "
                    f"{achieved[1]} / {achieved[2]} ({line[0].split('(')[1]}"]
    sides = [{patient(i) for i in splits[k]} for k in ("train", "val", "test")]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    rows = list(csv.DictReader(open(os.path.join(run, "rounds.csv"))))
    assert [int(r["labeled"]) for r in rows] == [329, 364]


def test_real_lgg_paper_split_is_impossible_on_two_patients(tmp_path):
    if not os.path.isdir(os.path.join(REAL, "kaggle_3m")):
        pytest.skip("real samples absent")
    d = ceal_mcdropout.keep_positive(common.load_data("lgg", os.path.join(REAL, "kaggle_3m"), 16, quiet=True))
    with pytest.raises(common.UserError, match="no patient left for the validation set"):
        common.make_splits(d, PAPER_LGG, 0)


# ------------------------------------------------------------------------------------------ bad data
def folder(root, n=12, px=32, mask=lambda i, m: m, mask_px=None):
    """images/ + masks/ of n RGB PNGs with a square lesion; `mask` may change each mask, `mask_px` its size."""
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n):
        m = np.zeros((px, px), np.uint8)
        m[8:8 + i % 5 + 4, 10:20] = 255
        Image.fromarray(np.stack([m // 2 + 40] * 3, -1)).save(os.path.join(root, "images", f"img{i:02d}.png"))
        m = Image.fromarray(mask(i, m))
        m = m.resize(mask_px, Image.NEAREST) if mask_px and i == 3 else m
        m.save(os.path.join(root, "masks", f"img{i:02d}_mask.png"))
    return str(root)


def test_every_training_mask_empty_stops_with_a_clear_message(tmp_path):
    root = folder(tmp_path / "data", mask=lambda i, m: m * 0)
    out = run_script("ceal_mcdropout.py", "--data", "folder", "--data-dir", root, "--image-size", 32, "--width", 4,
                     "--out", tmp_path / "runs", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {root}: all ")
    assert "masks of the training pool are empty" in err[0] and "0/255" in err[0] and "0/1" in err[0]


def fake_run(tmp_path):
    args = types.SimpleNamespace(resume=None, out=str(tmp_path), data="folder", strategy="x", seed=0, split=None,
                                 initial=None, query=None, rounds=3, data_dir=str(tmp_path / "data"))
    return common.Run("check.py", args, common.torch.device("cpu")), args


def test_mostly_empty_masks_warn_with_the_count(tmp_path, capsys):
    root = folder(tmp_path / "data", n=20, mask=lambda i, m: m if i % 4 == 0 else m * 0)  # 15 of 20 empty
    d = common.load_data("folder", root, 16, quiet=True)
    run, args = fake_run(tmp_path)
    tr, va, te = common.split_data(run, d, args, 10, 5, 100, split=[20, 0, 0])
    warn = [s for s in capsys.readouterr().out.splitlines() if s.startswith("warning:")]
    assert warn == [f"warning: 15 of 20 training-pool masks (75%) are empty; expected for lgg (most slices show "
                    f"no tumour), else check the masks in {args.data_dir} (lesion 255 or 1, background 0)"]
    # the synthetic data (~6 % empty) and a pool with half its masks empty pass without a word
    common.split_data(run, common.make_synthetic(60, 16), fake_run(tmp_path)[1], 10, 5, 100)
    common.check_foreground(d, np.r_[np.flatnonzero(d.positive), np.flatnonzero(~d.positive)[:5]])
    assert "warning" not in capsys.readouterr().out


def test_the_split_line_names_the_run_folder_and_the_plan(tmp_path, capsys):
    """Printed before the first epoch (minutes at a paper's size on a CPU): where the run is, and what it does."""
    run, args = fake_run(tmp_path)
    common.split_data(run, common.make_synthetic(60, 16), args, 10, 5, 100, split=[40, 0, 20])
    args.strategy = "full"
    common.split_data(run, common.make_synthetic(60, 16), args, 10, 5, 100, split=[40, 0, 20])
    assert capsys.readouterr().out.splitlines() == [
        f"run: {run.dir} on cpu: pool 40, validation 0, test 20; 4 labelled, then 3 rounds of +2",
        f"run: {run.dir} on cpu: pool 40, validation 0, test 20; all 40 labelled (the ceiling)"]


def test_inverted_masks_warn_and_real_ones_do_not(tmp_path, capsys):
    root = folder(tmp_path / "data", n=8, mask=lambda i, m: 255 - m)  # the lesion black on white
    common.load_data("folder", root, 16, quiet=True)
    assert capsys.readouterr().out.splitlines() == [
        f"warning: the masks in {root} are foreground on 100% of their border pixels; expected the object white "
        f"(255 or 1) on a black background: are they inverted?"]
    common.load_data("folder", folder(tmp_path / "right", n=8), 16, quiet=True)
    half = lambda i, m: np.r_[np.full((15, 32), 255), np.zeros((17, 32))].astype(np.uint8)  # the top 15 rows
    common.load_data("folder", folder(tmp_path / "half", n=8, mask=half), 16, quiet=True)  # large lesions: the edge
    assert capsys.readouterr().out == ""
    for name, sub in [("kvasir-seg", "Kvasir-SEG"), ("ph2", "PH2Dataset"), ("cvc-clinicdb", "CVC-ClinicDB")]:
        if os.path.isdir(os.path.join(REAL, sub)):  # the real masks: a few % of their border
            common.load_data(name, os.path.join(REAL, sub), 64, quiet=True)
            assert "warning" not in capsys.readouterr().out


def test_image_and_mask_of_different_sizes_stop(tmp_path, capsys):
    root = folder(tmp_path / "data", mask_px=(32, 30))
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: common.load_data("folder", root, 16, quiet=True))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err == (f"error: {os.path.join(root, 'images', 'img03.png')} is 32x32 but its mask "
                   f"{os.path.join(root, 'masks', 'img03_mask.png')} is 32x30: an image and its mask must have the "
                   f"same size (a mispaired file?)\n")


def test_jpeg_draft_decoding_is_not_a_size_mismatch(tmp_path):
    """read_image decodes a JPEG at a reduced DCT scale: the sizes compared are the files' own."""
    for sub in ("images", "masks"):
        os.makedirs(tmp_path / sub)
    Image.new("RGB", (256, 200), (120, 80, 60)).save(tmp_path / "images" / "a.jpg")
    Image.new("L", (256, 200), 255).save(tmp_path / "masks" / "a.jpg")
    im, size = loaders.read_image(str(tmp_path / "images" / "a.jpg"), "RGB", 32, with_size=True)
    assert im.size != (256, 200) and size == (256, 200)  # drafted, yet the header size is reported
    d = common.load_data("folder", str(tmp_path), 32, quiet=True)
    assert d.positive.tolist() == [True]


@pytest.mark.parametrize("name,sub", [("kvasir-seg", "Kvasir-SEG"), ("cvc-clinicdb", "CVC-ClinicDB"),
                                      ("ph2", "PH2Dataset"), ("lgg", "kaggle_3m")])
def test_real_samples_pass_the_size_check(name, sub):
    if not os.path.isdir(os.path.join(REAL, sub)):
        pytest.skip("real samples absent")
    d = common.load_data(name, os.path.join(REAL, sub), 16, quiet=True)
    assert len(d) > 0 and d.positive.any()


def test_images_of_more_than_8_bits_keep_their_contrast(tmp_path):
    """A 12-bit radiograph in a 16-bit PNG, a 32-bit integer and a float TIFF: scaled by their own range to
    0..255 (loaders.to_8bit), not clipped to white by Pillow's convert; their 16-bit masks stay binary."""
    for sub in ("images", "masks"):
        os.makedirs(tmp_path / sub)
    yy, xx = np.mgrid[:32, :32]
    disc = np.hypot(yy - 16, xx - 16) < 8
    raw = 300 + 3000 * disc + 20 * xx  # 300..3920: every pixel above 255
    nan = raw.astype(np.float32) / 7
    nan[0, 0], nan[0, 1] = np.nan, np.inf  # a float export's background: the finite pixels set the range
    for name, a, ext in (("u16", raw.astype(np.uint16), "png"), ("i32", raw.astype(np.int32), "tif"),
                         ("f32", nan, "tif")):
        Image.fromarray(a).save(tmp_path / "images" / f"{name}.{ext}")
        Image.fromarray((disc * 65535).astype(np.uint16)).save(tmp_path / "masks" / f"{name}_mask.png")
    want = np.round((raw - raw.min()) * 255 / (raw.max() - raw.min()))
    for channels in (1, 3):
        d = common.load_data("folder", str(tmp_path), 32, channels=channels, quiet=True)
        assert d.x.shape == (3, channels, 32, 32) and (d.y == disc).all()
        for k in range(3):
            assert np.abs(d.x[k].astype(float) - want)[..., 1:, 2:].max() <= 1, d.ids[k]  # the corner: resizing


def test_a_16_bit_mask_is_read_at_its_own_scale(tmp_path):
    """Pillow's conversion of a 16-bit mask clipped every value above 255 to 255: a 16-bit photo saved as a mask
    read as 93 % foreground and trained on (the fuzz of 2026-11-27). Now scaled by its own maximum
    (loaders.mask_8bit): the photo is refused as not binary, 0/k stays binary for every k, soft 16-bit edges are
    cut at half."""
    yy, xx = np.mgrid[:32, :32]
    photo = (np.random.default_rng(0).integers(0, 256, (32, 32)) * 257).astype(np.uint16)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(common.UserError, match=r"photo.png: mask is not binary \(\d+% of pixels between 50 and 205\)"):
        loaders.binarise_mask(np.asarray(loaders.read_image(str(tmp_path / "photo.png"), "L", mask=True)),
                              str(tmp_path / "photo.png"))
    disc = np.hypot(yy - 16, xx - 16) < 8
    for top in (1, 255, 1000, 4095, 65535):  # 0/1000, a 12-bit 0/4095: scaled by their own maximum
        Image.fromarray(disc.astype(np.uint16) * top).save(tmp_path / f"m{top}.png")
        m = loaders.read_image(str(tmp_path / f"m{top}.png"), "L", mask=True)
        assert (loaders.binarise_mask(np.asarray(m), "m") == disc).all()
    ramp = (xx * 65535 // 31).astype(np.uint16)  # 0 .. 65535 left to right: columns 16 on are above half
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert (np.asarray(loaders.read_image(str(tmp_path / "ramp.png"), "L", mask=True)) > 127).argmax(1).tolist() == [16] * 32


def one_line_error(capsys, fn):
    """fn() through common.run_main: exit status 2 and the single stderr line, returned."""
    with pytest.raises(SystemExit) as e:
        common.run_main(fn)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def test_two_files_of_one_sample_stop_instead_of_one_being_dropped(tmp_path, capsys):
    """a.png beside a.jpg used to be two samples with one id (the folder loader then took every image for the
    test set and the training pool both), and a second mask silently replaced the first."""
    root = folder(tmp_path / "img")
    Image.open(os.path.join(root, "images", "img03.png")).save(os.path.join(root, "images", "img03.jpg"))
    err = one_line_error(capsys, lambda: common.load_data("folder", root, 16, quiet=True))
    assert err == (f"error: {os.path.join(root, 'images', 'img03.jpg')} and {os.path.join(root, 'images', 'img03.png')}"
                   f": two files for sample 'img03'; keep one")
    root = folder(tmp_path / "mask")
    Image.new("L", (32, 32)).save(os.path.join(root, "masks", "img05.png"))
    assert "img05_mask.png: two files for sample 'img05'" in one_line_error(
        capsys, lambda: common.load_data("folder", root, 16, quiet=True))
    cvc = tmp_path / "cvc"
    for sub, names in (("Original", ("1.tif", "1.png", "2.tif")), ("Ground Truth", ("1.tif", "2.tif"))):
        os.makedirs(cvc / sub)
        for name in names:
            Image.new("RGB" if sub == "Original" else "L", (32, 32)).save(cvc / sub / name)
    assert "1.tif: two files for sample '1'" in one_line_error(
        capsys, lambda: common.load_data("cvc-clinicdb", str(cvc), 16, quiet=True))


def test_an_official_test_set_never_joins_the_pool():
    """make_splits without an official training set draws the pool from what the test set leaves."""
    d = common.make_synthetic(20, 16)
    d.official = {"test": np.arange(12, 20)}
    train, val, test = common.make_splits(d, [10, 2, 8], 0)
    assert test.tolist() == list(range(12, 20)) and not set(train) & set(test) and not set(val) & set(test)


def test_broken_link_unlisted_folder_bad_slice_name_and_subfolders(tmp_path, capsys, monkeypatch):
    root = folder(tmp_path / "link")
    os.symlink(tmp_path / "nowhere.png", os.path.join(root, "images", "zz.png"))
    os.symlink(tmp_path / "nowhere.png", os.path.join(root, "masks", "zz_mask.png"))
    assert one_line_error(capsys, lambda: common.load_data("folder", root, 16, quiet=True)) == (
        f"error: {os.path.join(root, 'images', 'zz.png')}: broken symbolic link (its target "
        f"{tmp_path / 'nowhere.png'} is missing)")
    root = folder(tmp_path / "closed")
    real_access = os.access
    monkeypatch.setattr(loaders.os, "access", lambda p, m: not p.endswith("masks") and real_access(p, m))
    assert one_line_error(capsys, lambda: common.load_data("folder", root, 16, quiet=True)) == (
        f"error: {os.path.join(root, 'masks')}: permission denied (the folder cannot be listed)")
    monkeypatch.undo()
    lgg_dir = tmp_path / "lgg" / "kaggle_3m" / "TCGA_CS_4941_19960909"
    os.makedirs(lgg_dir)
    for name in ("TCGA_CS_4941_19960909_1", "extra"):
        Image.new("RGB", (16, 16)).save(lgg_dir / f"{name}.tif")
        Image.new("L", (16, 16), 255).save(lgg_dir / f"{name}_mask.tif")
    assert one_line_error(capsys, lambda: common.load_data("lgg", str(tmp_path / "lgg"), 16, quiet=True)) == (
        f"error: {lgg_dir / 'extra.tif'}: expected TCGA_<patient>_<date>_<slice>.tif (the slice a number)")
    root = folder(tmp_path / "nested")
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub, "more"))
    os.rename(os.path.join(root, "images", "img11.png"), os.path.join(root, "images", "more", "img11.png"))
    os.rename(os.path.join(root, "masks", "img11_mask.png"), os.path.join(root, "masks", "more", "img11_mask.png"))
    assert len(common.load_data("folder", root, 16)) == 11
    notes = [s for s in capsys.readouterr().out.splitlines() if s.startswith("note:")]
    assert notes == [f"note: 1 image files in subfolders of {os.path.join(root, sub)} (e.g. "
                     f"{os.path.join(root, sub, 'more', f'img11{tail}.png')}) are not read; only the files directly "
                     f"in it are" for sub, tail in (("images", ""), ("masks", "_mask"))]


def test_a_cut_file_is_one_line_without_pillows_warnings(tmp_path):
    src = os.path.join(REAL, "CVC-ClinicDB")
    if not os.path.isdir(src):
        pytest.skip("real samples absent")
    import shutil
    shutil.copytree(src, tmp_path / "cvc")
    frame = tmp_path / "cvc" / "Original" / "1.tif"
    data = frame.read_bytes()
    frame.write_bytes(data[: len(data) // 2])  # its directory (at the end) cut: Pillow warns "Corrupt EXIF data"
    out = run_script("ceal_mcdropout.py", "--data", "cvc-clinicdb", "--data-dir", tmp_path / "cvc", "--image-size", 32,
                     "--out", tmp_path / "runs", check=False)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {frame}: unreadable image file"), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("script,flags,message", [
    ("example_tta", ["--query", "-3"], "--query -3: expected at least 1"),
    ("example_tta", ["--initial", "0"], "--initial 0: expected at least 1"),
    ("example_tta", ["--rounds", "-1"], "--rounds -1: expected at least 0"),
    ("example_tta", ["--epochs", "-1"], "--epochs -1: expected at least 0"),
    ("example_tta", ["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    ("example_tta", ["--width", "0"], "--width 0: expected at least 1"),
    ("example_tta", ["--seed", "-1"], "--seed -1: expected at least 0"),
    ("example_tta", ["--workers", "-1"], "--workers -1: expected at least 0"),
    ("example_tta", ["--lr", "-1"], "--lr -1.0: expected a finite learning rate above 0"),
    ("example_tta", ["--split", "-1", "8", "8"], r"--split \[-1, 8, 8\]: expected sizes of at least 0"),
    ("example_tta", ["--split", "0", "8", "8"], r"--split \[0, 8, 8\]: expected sizes of at least 0, the training "
                                                r"pool's \(the first\) at least 1"),
    ("example_tta", ["--image-size", "40"], "--image-size 40: expected a multiple of 16, at least 32 .*the nearest "
                                            "are 32 and 48"),
    ("example_tta", ["--image-size", "8"], "--image-size 8: expected a multiple of 16"),
    # 16 px leaves unet.UNet a 1x1 bottleneck: BatchNorm fails on a training batch of one image (e.g. 17 at 16)
    ("dsal_fingerbones", ["--image-size", "16"], r"--image-size 16: expected a multiple of 16, at least 32 \(the "
                                                 r"U-Net's poolings\); the nearest is 32$"),
    ("ceal_mcdropout", ["--mc-passes", "1"], "--mc-passes 1: expected at least 2"),
    ("ceal_mcdropout", ["--dropout", "1"], r"--dropout 1.0: expected a probability in \[0, 1\)"),
    ("polyp_weighted_cluster", ["--asa-members", "1"], "--asa-members 1: expected at least 2"),
    ("region_uncertainty", ["--mc-passes", "0"], "--mc-passes 0: expected at least 2"),
    ("ssl_coldstart", ["--clusters", "0"], "--clusters 0: expected at least 1"),
    ("ssl_coldstart", ["--image-size", "40"], "--image-size 40: expected a multiple of 16"),
    ("region_uncertainty", ["--image-size", "48"], "--image-size 48: expected a multiple of 32, at least 64 .*the "
                                                   "nearest is 64$"),
    ("region_uncertainty", ["--image-size", "144"], "the nearest are 128 and 160"),
    # float method flags: finite (a nan or inf ran to NaN features, a K-means traceback or a silent NaN run)
    ("polyp_weighted_cluster", ["--lam", "inf"], "--lam inf: expected a finite number$"),
    ("polyp_weighted_cluster", ["--delta", "nan"], "--delta nan: expected a finite number$"),
    ("polyp_weighted_cluster", ["--lam", "-1"], "--lam -1.0: expected at least 0$"),
    ("ssl_coldstart", ["--ssl-lr", "inf"], "--ssl-lr inf: expected a finite number$"),
    ("ssl_coldstart", ["--ssl-lr", "0"], "--ssl-lr 0.0: expected a learning rate above 0$"),
    ("region_uncertainty", ["--weight-decay", "-1"], "--weight-decay -1.0: expected at least 0$"),
    ("region_uncertainty", ["--momentum", "inf"], "--momentum inf: expected a finite number$"),
    ("region_uncertainty", ["--momentum", "1"], r"--momentum 1.0: expected a value in \[0, 1\)$"),
    ("example_claspe", ["--beta-start", "inf"], "--beta-start inf: expected a finite number$"),
    ("dsal_fingerbones", ["--ds-weights", "1", "nan", "1"], r"--ds-weights \[1.0, nan, 1.0\]: expected a finite"),
    ("dsal_fingerbones", ["--reach-tolerance", "-0.5"], "--reach-tolerance -0.5: expected at least 0$"),
    # the fuzz of 2026-11-27: a float torch cannot hold in float32 (a traceback from the optimiser),
    # MC dropout without dropout (every uncertainty 0, the picks arbitrary), an image size no memory holds, a
    # negative iteration (--epochs 0 stays: the SSL tests score with the pre-trained model alone; polyp's --delta -1
    # keeps the hinge always on, as its tests use it)
    ("region_uncertainty", ["--lr", "1e39"], r"--lr 1e\+39: expected at most 3.4e\+38 in size \(float32\)$"),
    ("ssl_coldstart", ["--ssl-lr", "1e39"], r"--ssl-lr 1e\+39: expected at most 3.4e\+38 in size"),
    ("dsal_fingerbones", ["--ds-weights", "1", "1e39", "1"], r"--ds-weights \[1.0, 1e\+39, 1.0\]: expected at most"),
    ("ceal_mcdropout", ["--dropout", "0"], r"--strategy ceal needs --dropout > 0 \(MC dropout: with none, every pass "),
    ("ssl_coldstart", ["--strategy", "mc-dropout", "--dropout", "0"], r"--strategy mc-dropout needs --dropout > 0"),
    ("ssl_coldstart", ["--strategy", "ceal", "--dropout", "0"], r"--strategy ceal needs --dropout > 0"),
    ("example_tta", ["--image-size", "4112"], r"--image-size 4112: expected at most 4096 \(every image is kept in "),
    ("ssl_coldstart", ["--dsal-pseudo-from", "-1"], "--dsal-pseudo-from -1: expected at least 0$")])
def test_numbers_out_of_range_stop_at_the_flags(script, flags, message):
    with pytest.raises(common.UserError, match=message):
        __import__(script).parse_args(flags)


def test_bad_out_and_damaged_run_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    tiny = ["--split", "24", "8", "8", "--image-size", "32", "--width", "4", "--initial", "6", "--query", "4",
            "--rounds", "1", "--epochs-initial", "1", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    import example_tta
    assert one_line_error(capsys, lambda: example_tta.main([*tiny, "--out", str(tmp_path / "file")])).startswith(
        f"error: --out {tmp_path / 'file'}: cannot make the run folder")
    assert one_line_error(capsys, lambda: example_tta.main([*tiny, "--out", ""])) == (  # not the current folder
        "error: --out '': expected a folder to hold the run folder (default: runs)")
    run = example_tta.main([*tiny, "--out", str(tmp_path / "runs")])
    capsys.readouterr()
    ckpt = os.path.join(run, "checkpoint.pt")
    with open(ckpt, "r+b") as f:
        f.truncate(1000)
    assert one_line_error(capsys, lambda: example_tta.main(["--resume", run])).startswith(
        f"error: {ckpt}: unreadable checkpoint (")
    cfg = os.path.join(run, "config.json")
    for text in ("{\"script\": \"example_t", "[1, 2]", "{\"script\": \"example_tta\"}", "{\"args\": {}}"):
        with open(cfg, "w") as f:
            f.write(text)
        assert one_line_error(capsys, lambda: example_tta.main(["--resume", run])) == (
            f"error: --resume {cfg}: not a run's config (unreadable JSON, or no script and flags in it); expected a "
            f"run folder this script wrote")
