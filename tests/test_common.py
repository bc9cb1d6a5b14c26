"""common.py: metrics, losses, splits, cache, loaders (real sample files and official-layout fixtures),
bad input, MC dropout."""
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import ceal_mcdropout
import common
import loaders
from conftest import REAL
from unet import UNet, count_parameters


# ---------------------------------------------------------------------------------------- metrics, losses
def masks(*rows):
    return torch.tensor(np.array(rows, dtype=np.uint8)).bool()


def test_dice_iou_hand_cases():
    gt = masks([[1, 1, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]])
    pred = masks([[1, 0, 0, 0]], [[0, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 1]])
    dice, iou = common.dice_iou(pred, gt)
    # |A∩B| = 1, |A| + |B| = 3 -> 2/3; IoU 1/2. Disjoint -> 0. Both empty -> 1. Empty GT, one false positive -> 0.
    assert dice.tolist() == pytest.approx([2 / 3, 0, 1, 0, 1])
    assert iou.tolist() == pytest.approx([1 / 2, 0, 1, 0, 1])


def test_evaluate_averages_per_image_not_per_batch():
    """Two images, batch size 1 vs 2: the per-image mean is the same; a pooled-pixel Dice would differ."""
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts the first channel thresholded
            return (x[:, :1] - 0.5) * 100

    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[0, 0, :2] = 255          # image 0 predicts 8 pixels
    x[1, 0, 0, 0] = 255        # image 1 predicts 1 pixel
    y = torch.zeros(2, 4, 4, dtype=torch.uint8)
    y[0, :2] = 1               # image 0: perfect (Dice 1)
    y[1, 3, 3] = 1             # image 1: disjoint (Dice 0)
    for bs in (1, 2):
        dice, iou = common.evaluate(Fixed(), x, y, [0, 1], bs, torch.device("cpu"))
        assert dice.tolist() == [1.0, 0.0] and dice.mean() == 0.5


def test_soft_dice_and_bce_dice_losses():
    target = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    big = 20.0
    perfect = torch.tensor([[[[big, -big], [-big, -big]]]])
    assert common.soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # logits 0 -> p = 0.5 everywhere: soft Dice = (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    zero = torch.zeros(1, 1, 2, 2)
    assert common.soft_dice_loss(zero, target).item() == pytest.approx(0.5)
    # BCE at p = 0.5 is ln 2 for every pixel
    assert common.bce_dice_loss(zero, target).item() == pytest.approx(np.log(2) + 0.5, rel=1e-5)
    wrong = -perfect
    assert common.bce_dice_loss(wrong, target) > common.bce_dice_loss(zero, target) > common.bce_dice_loss(perfect, target)


def test_train_trains_every_epoch_in_train_mode():
    """A loop body that predicts between epochs (forward_batches: eval mode, as CEAL's per-epoch validation) does
    not leave the next epoch training in eval mode: BatchNorm counts a batch only in train mode."""
    torch.manual_seed(0)
    model, x = UNet(3, 1, 4), torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    y = (x[:, 0] > 127).to(torch.uint8)
    opt = torch.optim.Adam(model.parameters())
    for _ in common.train_epochs(model, opt, x, y, np.arange(10), 3, 4, device=torch.device("cpu")):
        common.predict(model, x, [0, 1], 2, torch.device("cpu"))
    assert int(model.enc[0].bn1.num_batches_tracked) == 3 * 3  # 3 epochs of 3 batches


def test_a_long_epoch_prints_a_line_every_minute(monkeypatch, capsys):
    """An epoch of minutes (a paper's size on a CPU) says how far it got once a minute; a short one prints nothing."""
    model, x = UNet(3, 1, 4), torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    y, opt = (x[:, 0] > 127).to(torch.uint8), torch.optim.SGD(model.parameters(), lr=0.1)
    common.train(model, opt, x, y, np.arange(10), 1, 4, device=torch.device("cpu"))
    assert capsys.readouterr().out == ""
    clock = iter(range(0, 10000, 35))  # 35 s from one reading of the clock to the next
    monkeypatch.setattr(common, "time", types.SimpleNamespace(time=lambda: next(clock)))
    common.train(model, opt, x, y, np.arange(10), 1, 4, device=torch.device("cpu"))
    # the clock at the start 0, after the batches 35, 70 (a line: 60 s since the start), 105, then 140 at the end
    assert capsys.readouterr().out.splitlines() == ["    8/10 images of this epoch, 1m10s"]


def test_train_adds_extra_loss_every_step():
    """extra_loss(model) is added to the loss (not subtracted) at every step: the polyp script's feature
    discrepancy loss is minimised. A constant segmentation loss leaves only w's own gradient, 1 per step."""
    class W(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x[:, :1].float() * 0

    model, x = W(), torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common.train(model, opt, x, x[:, 0], np.arange(4), 1, 2, device=torch.device("cpu"),
                 loss_fn=lambda out, t: out.sum(), extra_loss=lambda m: m.w.sum())
    assert model.w.item() == pytest.approx(1 - 2 * 0.1)  # two steps of batch 2, each w -= lr x 1


def test_head_agreement_pairs_each_head_with_the_final_one():
    """DSAL Eq. 3: L-DSC = Dice(lower, final), M-DSC = Dice(middle, final), never a head against the other."""
    lower, middle = masks([1, 1, 0, 0], [0, 0, 1, 1]), masks([0, 0, 1, 1], [1, 1, 0, 0])
    final = masks([0, 0, 1, 1], [0, 0, 1, 1])
    score, l_dsc, m_dsc = common.head_agreement(lower, middle, final)
    assert l_dsc.tolist() == [0, 1] and m_dsc.tolist() == [1, 0] and score.tolist() == [0.5, 0.5]


def test_kmeans_on_identical_rows_says_so_in_one_line(capsys, recwarn):
    """Identical images give identical features: fewer distinct rows than clusters leave clusters empty, said
    in one note line, without scikit-learn's two-line ConvergenceWarning; distinct rows say nothing."""
    feats = np.repeat(np.eye(3)[:2], 5, axis=0)  # 10 rows, 2 distinct
    km = common.kmeans(feats, 4, seed=0)
    assert len(set(km.labels_)) == 2 and not [w for w in recwarn if "distinct clusters" in str(w.message)]
    assert capsys.readouterr().out == ("note: 2 distinct feature vectors among the 10 pool samples (identical "
                                       "images?), fewer than the 4 clusters: 2 cluster(s) stay empty\n")
    weighted = common.kmeans([[0.0], [1.0], [10.0]], 2, seed=0, weight=[1.0, 3.0, 1.0])  # the weights reach KMeans:
    assert capsys.readouterr().out == "" and sorted(weighted.cluster_centers_[:, 0]) == pytest.approx([0.75, 10])
    assert weighted.inertia_ == pytest.approx(1 * 0.75 ** 2 + 3 * 0.25 ** 2)  # {0, 1} centred at (0 + 3) / 4


def test_unet_paper_size_and_features():
    assert 30.9e6 < count_parameters(UNet(3, 1, 64)) < 31.1e6  # CEAL Sec. 1.2: "around 31 million"
    m = UNet(1, 1, 8, up="bilinear", dropout=0.1, dropout_at="bottleneck")
    x = torch.zeros(2, 1, 32, 32)
    assert m(x).shape == (2, 1, 32, 32)
    assert m.features(x).shape == (2, 128, 2, 2)


# ------------------------------------------------------------------------------------------------- splits
def grouped(n_groups=20, per=(3, 9)):
    rng = np.random.default_rng(0)
    sizes = rng.integers(*per, n_groups)
    groups = np.repeat([f"P{g:02d}" for g in range(n_groups)], sizes)
    n = len(groups)
    return common.Data(np.zeros((n, 1, 4, 4), np.uint8), np.zeros((n, 4, 4), np.uint8),
                       [f"s{i}" for i in range(n)], {}, groups, "grouped")


def test_splits_disjoint_sized_and_seeded():
    d = common.make_synthetic(50, 16)
    tr, va, te = common.make_splits(d, (30, 8, 12), seed=1)
    assert (len(tr), len(va), len(te)) == (30, 8, 12)
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    again = common.make_splits(d, (30, 8, 12), seed=1)
    other = common.make_splits(d, (30, 8, 12), seed=2)
    assert all((a == b).all() for a, b in zip((tr, va, te), again))
    assert not (tr == other[0]).all()


def test_splits_never_cut_a_patient():
    d = grouped()
    tr, va, te = common.make_splits(d, (40, 15, 20), seed=3)
    splits = [set(d.groups[s]) for s in (tr, va, te)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert abs(len(te) - 20) <= 4 and abs(len(va) - 15) <= 4 and len(tr) == 40   # within half a patient (3..8)


def test_official_splits_are_used():
    d = common.make_synthetic(40, 16)
    d.official = {"train": np.arange(0, 25), "val": np.arange(25, 30), "test": np.arange(30, 40)}
    tr, va, te = common.make_splits(d, (20, 5, 10), seed=0)
    assert set(te) == set(range(30, 40)) and set(va) == set(range(25, 30)) and set(tr) <= set(range(25))
    # validation larger than the official one is drawn from the official training set (CEAL ISIC 1600/400)
    tr, va, te = common.make_splits(d, (15, 10, 10), seed=0)
    assert set(va) <= set(range(25)) and not set(va) & set(tr)


def test_split_too_large_is_a_clear_error():
    with pytest.raises(common.UserError, match="cannot fill the split"):
        common.make_splits(common.make_synthetic(20, 16), (15, 5, 5), 0)


def test_budget_larger_than_pool():
    with pytest.raises(common.UserError, match="exceeds the training pool of 50"):
        common.check_budget(50, 20, 10, 4)


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_varied():
    a, b, c = common.make_synthetic(120, 48, seed=0), common.make_synthetic(120, 48, seed=0), common.make_synthetic(120, 48, seed=1)
    assert (a.x == b.x).all() and (a.y == b.y).all() and not (a.x == c.x).all()
    assert a.x.dtype == np.uint8 and a.x.shape == (120, 3, 48, 48) and set(np.unique(a.y)) <= {0, 1}
    area = a.y.reshape(120, -1).mean(1)
    kinds = set(a.kinds)
    assert {"empty", "tiny", "low-contrast", "normal", "duplicate"} <= kinds
    assert (area == 0).any() and (0 < area).any() and area.max() > 0.1 and 0 < area[area > 0].min() < 0.01
    assert common.make_synthetic(5, 32, channels=1).x.shape == (5, 1, 32, 32)


# ----------------------------------------------------------------------------------- fixtures in layouts
def write_pair(img_path, mask_path, rng, size=(40, 30), mask_value=255, fmt=None):
    os.makedirs(os.path.dirname(img_path), exist_ok=True)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(img_path)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[5:20, 8:30] = mask_value
    Image.fromarray(m).save(mask_path)


def isic2017_fixture(root, counts=(6, 2, 3)):
    rng = np.random.default_rng(0)
    k = 0
    for (img_dir, gt_dir), n in zip([("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
                                     ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
                                     ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth")], counts):
        for _ in range(n):
            write_pair(root / img_dir / f"ISIC_{k:07d}.jpg", root / gt_dir / f"ISIC_{k:07d}_segmentation.png", rng)
            Image.new("RGB", (4, 4)).save(root / img_dir / f"ISIC_{k:07d}_superpixels.png")  # must be skipped
            k += 1
    return root


def isic2018_fixture(root):
    rng = np.random.default_rng(1)
    for s, n in (("Training", 5), ("Validation", 2), ("Test", 2)):
        for k in range(n):
            write_pair(root / f"ISIC2018_Task1-2_{s}_Input" / f"ISIC_{s[:2]}{k:05d}.jpg",
                       root / f"ISIC2018_Task1_{s}_GroundTruth" / f"ISIC_{s[:2]}{k:05d}_segmentation.png", rng)
    return root


def folder_fixture(root, n=6):
    rng = np.random.default_rng(2)
    for k in range(n):
        suffix = ["", "_mask", "_segmentation"][k % 3]
        write_pair(root / "images" / f"case{k}.png", root / "masks" / f"case{k}{suffix}.png", rng)
    return root


def test_isic2017_layout(tmp_path):
    d = common.load_data("isic2017", str(isic2017_fixture(tmp_path)), 32)
    assert len(d) == 11 and d.x.shape == (11, 3, 32, 32) and d.y.dtype == np.uint8
    assert {k: len(v) for k, v in d.official.items()} == {"train": 6, "val": 2, "test": 3}
    assert not any("superpixels" in i for i in d.ids) and set(np.unique(d.y)) == {0, 1}
    tr, va, te = common.make_splits(d, (4, 2, 3), seed=0)
    assert set(te) == set(d.official["test"])


def test_isic2018_layout(tmp_path):
    d = common.load_data("isic2018", str(isic2018_fixture(tmp_path)), 32)
    assert {k: len(v) for k, v in d.official.items()} == {"train": 5, "val": 2, "test": 2}
    # the paper's 2594 / 100 / 1000 are the official sets: train, validation and test each from its own
    tr, va, te = common.make_splits(d, (5, 2, 2), seed=0)
    assert [sorted(s) for s in (tr, va, te)] == [sorted(d.official[k]) for k in ("train", "val", "test")]


def test_folder_layout_with_mask_suffixes(tmp_path):
    d = common.load_data("folder", str(folder_fixture(tmp_path)), 24, channels=1)
    assert d.ids == [f"case{k}" for k in range(6)] and d.x.shape == (6, 1, 24, 24)
    assert d.y.sum() > 0


def test_cache_hit_rebuild_and_equivalence(tmp_path, capsys):
    root = folder_fixture(tmp_path / "data")
    fresh = common.load_data("folder", str(root), 24)
    assert "decoded" in capsys.readouterr().out
    cached = common.load_data("folder", str(root), 24)
    assert "from cache" in capsys.readouterr().out
    assert (fresh.x == cached.x).all() and (fresh.y == cached.y).all() and fresh.ids == cached.ids
    common.load_data("folder", str(root), 16)                   # another size: another cache entry
    assert "decoded" in capsys.readouterr().out
    m = np.zeros((30, 40), np.uint8)
    Image.fromarray(m).save(root / "masks" / "case0.png")      # a file changed: rebuilt, new content
    os.utime(root / "masks" / "case0.png", ns=(1, 1))
    changed = common.load_data("folder", str(root), 24)
    assert "decoded" in capsys.readouterr().out
    assert changed.y[0].sum() == 0 and fresh.y[0].sum() > 0
    assert len(os.listdir(os.environ["ALSEG_CACHE"])) == 3


# ------------------------------------------------------------------------------------------- real samples
def real(name):
    path = os.path.join(REAL, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} absent")
    return path


def test_real_cvc_clinicdb_raw_tiffs_and_stray_mask_values():
    d = common.load_data("cvc-clinicdb", real("CVC-ClinicDB"), 64)
    assert len(d) == 10 and d.ids[:3] == ["1", "2", "3"] and d.x.shape == (10, 3, 64, 64)
    assert set(np.unique(d.y)) == {0, 1} and d.x.std() > 10
    frame = loaders.read_raw_tiff(os.path.join(REAL, "CVC-ClinicDB", "Original", "1.tif"))
    assert frame.shape == (288, 384, 3)
    # mask 1.tif holds stray values 5..12 besides 0 and 255: thresholded at >127, about 15 % foreground
    assert 0.1 < d.y[0].mean() < 0.2


def test_real_kvasir_jpeg_masks():
    d = common.load_data("kvasir-seg", real("Kvasir-SEG"), 48)
    assert len(d) == 10 and d.x.shape == (10, 3, 48, 48) and set(np.unique(d.y)) == {0, 1}
    assert all(0 < a < 0.6 for a in d.y.reshape(10, -1).mean(1))


def test_real_ph2_one_bit_and_rgb_masks():
    d = common.load_data("ph2", real("PH2Dataset"), 32)
    assert d.ids == ["IMD002", "IMD058", "IMD155", "IMD437"]
    assert set(np.unique(d.y)) == {0, 1} and all(d.y.reshape(4, -1).mean(1) > 0.05)


def test_real_lgg_patients_and_tumour_slices():
    d = common.load_data("lgg", real("kaggle_3m"), 64)
    assert len(d) == 16 and set(d.groups) == {"TCGA_CS_4941", "TCGA_DU_5849"} and d.x.shape[1] == 3
    pos = ceal_mcdropout.keep_positive(d)
    assert 0 < len(pos) < len(d) and all(pos.y.reshape(len(pos), -1).any(1))
    tr, va, te = common.make_splits(pos, (1, 0, 1), seed=0)
    assert not set(pos.groups[tr]) & set(pos.groups[te])  # patients are never split


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(common.UserError, match="needs --data-dir"):
        common.load_data("isic2017", None, 32)
    with pytest.raises(common.UserError, match="nowhere: folder not found"):
        common.load_data("isic2017", str(tmp_path / "nowhere"), 32)
    wrong = folder_fixture(tmp_path / "wrong")
    with pytest.raises(common.UserError, match="expected the official layout with ISIC-2017_Training_Data"):
        common.load_data("isic2017", str(wrong), 32)

    root = isic2017_fixture(tmp_path / "nomask", (3, 0, 0))
    os.remove(root / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000001_segmentation.png")
    with pytest.raises(common.UserError, match=r"ISIC_0000001\.jpg: no mask for this image"):
        common.load_data("isic2017", str(root), 32)

    root = folder_fixture(tmp_path / "noimage")
    os.remove(root / "images" / "case2.png")
    with pytest.raises(common.UserError, match=r"case2_segmentation\.png: mask without an image"):
        common.load_data("folder", str(root), 32)

    root = folder_fixture(tmp_path / "broken")
    (root / "images" / "case1.png").write_bytes(b"not an image at all")
    with pytest.raises(common.UserError, match=r"case1\.png: unreadable image file \(UnidentifiedImageError"):
        common.load_data("folder", str(root), 32)
    (root / "images" / "case1.png").write_bytes(b"")  # a copy cut short
    with pytest.raises(common.UserError, match=r"case1\.png: unreadable image file \(an empty file, 0 bytes\)$"):
        common.load_data("folder", str(root), 32)

    root = folder_fixture(tmp_path / "gray")
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))).save(root / "masks" / "case3.png")
    with pytest.raises(common.UserError, match=r"case3\.png: mask is not binary"):
        common.load_data("folder", str(root), 32)
    Image.fromarray(np.tile(np.arange(3, dtype=np.uint8), (30, 14))[:, :40]).save(root / "masks" / "case3.png")
    with pytest.raises(common.UserError, match=r"case3\.png: mask values 0..2 are not binary"):
        common.load_data("folder", str(root), 32)


# ------------------------------------------------------------------------------------------------ MC dropout
def test_mc_dropout_batched_and_looped_agree():
    torch.manual_seed(0)
    x = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    for at in ("every", "bottleneck"):
        det = UNet(3, 1, 4, dropout=0.0, dropout_at=at).eval()
        ref = torch.sigmoid(det(x.float() / 255))[:, 0]
        for batched in (False, True):
            (_, mean, var), = list(common.mc_dropout(det, x, np.arange(6), 5, 6, cpu, batched=batched))
            assert torch.allclose(mean, ref, atol=1e-5) and var.max() < 1e-6  # p = 0: passes identical (float32 rounding of E[p²] - E[p]²)
        m = UNet(3, 1, 4, dropout=0.5, dropout_at=at)
        with torch.no_grad():  # BatchNorm statistics of real activations, so that eval-mode BN is not ~identity
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.momentum = None
            m.train()(x.float() / 255)
            m.head.weight.mul_(20)  # spread the probabilities around 0.5
        stats = []
        for batched in (False, True):
            torch.manual_seed(1)
            (_, mean, var), = list(common.mc_dropout(m, x, np.arange(6), 200, 6, cpu, batched=batched))
            stats.append((mean, var))
        (m0, v0), (m1, v1) = stats
        assert v0.mean() > 1e-3  # dropout really was on
        # two independent T-sample estimates: E|m0 - m1| = sqrt(2 var / T) sqrt(2 / pi) ≈ 0.8 sqrt(2 var / T)
        assert (m0 - m1).abs().mean() < 1.5 * torch.sqrt(2 * v0.mean() / 200)
        assert abs(v0.mean() - v1.mean()) < 0.1 * v0.mean()
        assert not m.training  # left in eval mode


def test_mc_variance_sums_the_variance_and_thresholds_the_mean(monkeypatch):
    """CEAL Sec. 4.1 from mc_dropout's per-pixel moments: the image score is the sum of the variances (not of
    the standard deviations), the pseudo-label the mean probability above 0.5 (a pixel at exactly 0.5 is out)."""
    mean = torch.tensor([[[0.2, 0.5], [0.51, 0.9]], [[0.45, 0.55], [0.3, 0.7]]])
    var = torch.tensor([[[0.04, 0.01], [0.0, 0.09]], [[0.25, 0.0], [0.01, 0.01]]])
    monkeypatch.setattr(common, "mc_dropout", lambda model, x, idx, *a: iter([(torch.arange(2), mean, var)]))
    scores, pseudo = common.mc_variance(None, torch.zeros(2, 3, 2, 2), [0, 1], 20, 2, torch.device("cpu"))
    assert scores.tolist() == pytest.approx([0.14, 0.27])
    assert pseudo.tolist() == [[[0, 0], [1, 1]], [[0, 1], [0, 1]]]


def test_mc_dropout_moments_by_hand_on_every_path():
    """CEAL Sec. 4.1: mc_dropout's per-pixel mean and variance over the T passes are the sample moments, the
    variance E[p^2] - E[p]^2 (population, ddof 0, as its docstring's sums), here on known pass probabilities with
    a different mean per pixel and a first pass away from it; the same on the looped path (the CPU default the
    scripts take), the batched one and encoder once (dropout at the bottleneck)."""
    T, B, H, W = 5, 2, 3, 3
    probs = torch.rand((T, B, H, W), generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05

    class Passes(torch.nn.Module):                 # the t-th pass over the batch gives probs[t], in call order
        def __init__(self, split):
            super().__init__()
            self.t, self.dropout_at = 0, "bottleneck" if split else "every"
            if split:
                self.encode, self.decode = lambda xb: [xb], lambda feats: self(feats[0])

        def forward(self, xb):
            r = len(xb) // B
            self.t += r
            return torch.logit(probs[self.t - r:self.t].reshape(r * B, 1, H, W))
    x = torch.zeros(B, 1, H, W, dtype=torch.uint8)
    for batched, split in ((False, False), (True, False), (False, True), (True, True)):
        model = Passes(split)
        (_, mean, var), = list(common.mc_dropout(model, x, np.arange(B), T, B, torch.device("cpu"), batched=batched))
        assert model.t == T, (batched, split)
        assert torch.allclose(mean, probs.mean(0), atol=1e-6), (batched, split)
        assert torch.allclose(var, probs.var(0, unbiased=False), atol=1e-6), (batched, split)
    scores, _ = common.mc_variance(Passes(False), x, np.arange(B), T, B, torch.device("cpu"))
    assert scores == pytest.approx(probs.var(0, unbiased=False).sum((1, 2)).numpy(), abs=1e-5)


def test_mc_dropout_keeps_batchnorm_in_eval_mode():
    """PROTOCOLS (Baseline query rules): MC dropout runs its passes with dropout on and BatchNorm in eval mode
    (running statistics), on every path; the running statistics are not updated by the passes."""
    torch.manual_seed(0)
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    for at in ("every", "bottleneck"):
        m = UNet(3, 1, 4, dropout=0.5, dropout_at=at)
        modes = {"bn": set(), "drop": set()}
        for mod in m.modules():
            kind = "bn" if isinstance(mod, torch.nn.BatchNorm2d) else "drop" if isinstance(mod, torch.nn.Dropout) \
                else None
            if kind:
                mod.register_forward_pre_hook(lambda mod, inp, kind=kind: modes[kind].add(mod.training))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        for batched in (False, True):
            list(common.mc_dropout(m, x, np.arange(4), 3, 4, torch.device("cpu"), batched=batched))
        assert modes == {"bn": {False}, "drop": {True}}, at
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------------------- query rules
def test_query_random_draws_without_replacement():
    """PROTOCOLS: uniform without replacement from the pool, seeded."""
    pool = np.arange(100, 120)
    for seed in range(20):
        picks = common.query_random(pool, 15, np.random.default_rng(seed))
        assert len(picks) == 15 and len(set(picks.tolist())) == 15 and set(picks.tolist()) <= set(pool.tolist())
    assert sorted(common.query_random(pool, 20, np.random.default_rng(0)).tolist()) == pool.tolist()
    assert sorted(common.query_random(pool, 50, np.random.default_rng(0)).tolist()) == pool.tolist()  # k > pool
    again = [common.query_random(pool, 5, np.random.default_rng(1)) for _ in range(2)]  # seeded
    assert again[0].tolist() == again[1].tolist()


def test_top_k_ties_in_the_rng_order_not_by_pool_position():
    """top_k: exact ties (e.g. saturated predictions) in a random order drawn from rng, not the lowest pool
    positions; strict order first; without rng, stable by pool position."""
    pool = np.arange(10, 30)
    scores = np.r_[5.0, np.zeros(19)]  # one clear winner, then 19 tied
    assert common.top_k(pool, scores, 4).tolist() == [10, 11, 12, 13]
    picks = [common.top_k(pool, scores, 4, rng=np.random.default_rng(s)) for s in range(10)]
    assert all(p[0] == 10 for p in picks)                           # the strict winner always first
    assert len({tuple(p[1:]) for p in picks}) > 5                   # the tied three differ with the seed
    assert any(set(p[1:]) & set(range(20, 30)) for p in picks)      # and are not stuck at the lowest positions
    assert common.top_k(pool, -scores, 1, largest=False, rng=np.random.default_rng(0)).tolist() == [10]


@pytest.mark.parametrize("redraw", [False, True])
def test_add_labels_oracle_gets_the_truth_pseudo_the_models_mask(redraw):
    """common.add_labels (CEAL Sec. 4.3; SSL's comparators): the oracle's picks get the ground truth, the pseudo
    group the model's masks (never the truth); without redraw the pseudo-labelled leave the pool and keep their
    mask, with redraw (the CEAL reference code, DSAL) last round's go back unlabelled and the new stay in the pool."""
    y = torch.arange(6, dtype=torch.uint8)[:, None, None].repeat(1, 2, 2) % 2  # truth: 0 1 0 1 0 1
    labeled, pseudo, pool = np.array([0]), np.zeros(0, np.int64), np.arange(1, 6)
    target = common.training_target(y, labeled)
    assert bool((target[1:] == common.UNLABELLED).all()) and bool((target[0] == y[0]).all())
    mask = lambda v: torch.full((1, 2, 2), v, dtype=torch.uint8)
    labeled, pseudo, pool = common.add_labels(target, y, {"oracle-a": np.array([1]), "pseudo": np.array([2])},
                                              mask(1), labeled, pseudo, pool, redraw=redraw)
    assert labeled.tolist() == [0, 1] and pseudo.tolist() == [2]
    assert pool.tolist() == ([2, 3, 4, 5] if redraw else [3, 4, 5])
    assert bool((target[1] == 1).all()) and bool((target[2] == 1).all())  # sample 2's truth is 0: the model's mask
    labeled, pseudo, pool = common.add_labels(target, y, {"oracle-a": np.array([3]), "pseudo": np.array([4])},
                                              mask(1), labeled, pseudo, pool, redraw=redraw)
    assert labeled.tolist() == [0, 1, 3]
    assert pseudo.tolist() == ([4] if redraw else [2, 4])
    assert pool.tolist() == ([2, 4, 5] if redraw else [5])
    assert bool((target[2] == (common.UNLABELLED if redraw else 1)).all())
    target[0] = common.UNLABELLED  # a labelled sample without a label: a bug in the sets, caught
    with pytest.raises(RuntimeError, match="no label"):
        common.add_labels(target, y, {"oracle-a": np.array([5])}, None, labeled, pseudo, pool, redraw=redraw)
