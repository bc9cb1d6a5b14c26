"""The numbers the polyp, DSAL and SSL scripts report beside their papers' on hand-computed cases: polyp's
fg_share, its Dice / polyp IoU / class-mean IoU, Table 1's cells and --table-labeled, the summary's paper
cell, the CVC shares on other data, the K-means restarts; DSAL's summary, Spearman with a nan, normalisation
(in main() too) and small folders' split; SSL's pre-trained weights saved and returned, and min-max per image.
Each test was written for a mutant of its rule that the rest of the suite let through or caught only by the
behaviour record (2026-11-27), and was run once against it and failed."""
import math
import types

import numpy as np
import pytest
import torch

import common
import dsal_fingerbones as dsal
import polyp_weighted_cluster as pwc
import ssl_coldstart as S

class IndexedLogits(torch.nn.Module):
    """forward(x) -> LOGITS[i] (B, 1, H, W) for image i, whose first pixel (channel 0) holds i."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.logit(probs.float(), eps=1e-7)[:, None])

    def forward(self, x):
        return self.logits[(x[:, 0, 0, 0] * 255).round().long()]


class Stop(Exception):
    """Raised by a replaced step to end main() where the test has seen what it needs."""


def indexed_inputs(n, h=4, w=4):
    x = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return x


# ---- polyp_weighted_cluster.fg_share -------------------------------------------------------------------------
def test_pwc_fg_share_is_the_pixel_share_of_predicted_and_true_polyp():
    """fg_share(idx) = (#pixels with p > 0.5 over x[idx]) / (|idx| H W) and the true mask's mean over y[idx].
    Images 4x4: image 0 predicts 3 pixels, image 1 5 pixels, image 2 all 16 (left out of idx).
    Masks (0/1): image 0 has 4 polyp pixels, image 1 none, image 2 all 16.
    idx = [1, 0]: predicted (3 + 5) / 32 = 0.25; true 4 / 32 = 0.125."""
    probs = torch.zeros(3, 4, 4)
    probs[0].view(-1)[:3] = 0.9
    probs[1].view(-1)[:5] = 0.9
    probs[1].view(-1)[5] = 0.5          # exactly 0.5 is not polyp (p > 0.5)
    probs[2] = 0.9
    y = torch.zeros(3, 4, 4, dtype=torch.uint8)
    y[0, 0, :4] = 1
    y[2] = 1
    args = types.SimpleNamespace(batch_size=1, amp=False)
    pred, true = pwc.fg_share(IndexedLogits(probs), indexed_inputs(3), y, np.array([1, 0]), args,
                              torch.device("cpu"))
    assert pred == pytest.approx(0.25)
    assert true == pytest.approx(0.125)
    # no masks for the pool: nan; empty pool: ("", "")
    pred2, true2 = pwc.fg_share(IndexedLogits(probs), indexed_inputs(3), None, np.array([2]), args,
                                torch.device("cpu"))
    assert pred2 == pytest.approx(1.0) and math.isnan(true2)
    assert pwc.fg_share(IndexedLogits(probs), indexed_inputs(3), y, np.array([], int), args,
                        torch.device("cpu")) == ("", "")


# ---- polyp_weighted_cluster.evaluate: Table 1's mIoU is the class mean, Dice the polyp's -----------------------
def test_pwc_evaluate_returns_dice_polyp_iou_and_class_mean_iou_per_image():
    """Image 0 (4x4): prediction 2 pixels, truth 1 of them -> Dice 2/3, polyp IoU 1/2, background IoU 14/15,
    mIoU (1/2 + 14/15) / 2. Image 1: nothing predicted, nothing true -> 1, 1, 1. idx order is kept."""
    probs = torch.zeros(2, 4, 4)
    probs[0, 0, :2] = 0.9
    y = torch.zeros(2, 4, 4, dtype=torch.uint8)
    y[0, 0, 0] = 1
    d, i, m = pwc.evaluate(IndexedLogits(probs), indexed_inputs(2), y, np.array([0, 1]), 1, torch.device("cpu"))
    assert d.tolist() == pytest.approx([2 / 3, 1.0])
    assert i.tolist() == pytest.approx([1 / 2, 1.0])
    assert m.tolist() == pytest.approx([(1 / 2 + 14 / 15) / 2, 1.0])
    d, i, m = pwc.evaluate(IndexedLogits(probs), indexed_inputs(2), y, np.array([1, 0]), 2, torch.device("cpu"))
    assert m.tolist() == pytest.approx([1.0, (1 / 2 + 14 / 15) / 2])


# ---- polyp_weighted_cluster.tables: Table 1 at the --table-labeled counts, with the paper's CVC numbers ----------
def _stat(labeled, strategy, miou, dice):
    return dict(labeled=labeled, strategy=strategy, n=1, miou_mean=miou, dice_mean=dice, miou_mean_std=0.0)


def test_pwc_table1_keeps_the_requested_counts_and_the_papers_cvc_cells(monkeypatch, capsys):
    """Stats at 30, 90 and 180 labelled for random and ours on cvc-clinicdb: Table 1 at (90, 120, 180) keeps 90
    and 180 only, ordered (count, random before ours), each beside Table 1 of the paper (mIoU, Dice):
    90 random 0.8388 / 0.8225, 90 ours 0.8561 / 0.8466, 180 random 0.8709 / 0.8636, 180 ours 0.8922 / 0.8891."""
    stats = [_stat(c, s, 0.5, 0.4) for c in (180, 30, 90) for s in ("ours", "random")]
    monkeypatch.setattr(common, "collect_runs", lambda paths: [
        dict(script="polyp_weighted_cluster", finished=True, data="cvc-clinicdb", run="r", flags={})])
    monkeypatch.setattr(common, "summarise", lambda rows, keys, cols: [dict(s) for s in stats])
    seen = []
    monkeypatch.setattr(common, "markdown_table", lambda rows, *a, **k: seen.append(rows) or "")
    pwc.tables(["x"], [90, 120, 180])
    t1 = seen[0]
    assert [(s["labeled"], s["strategy"]) for s in t1] == [(90, "random"), (90, "ours"), (180, "random"), (180, "ours")]
    assert [(s["paper_miou"], s["paper_dice"]) for s in t1] == [
        (0.8388, 0.8225), (0.8561, 0.8466), (0.8709, 0.8636), (0.8922, 0.8891)]
    # Table 2 of the paper (ablation mIoU %, CVC-ClinicDB), row "ours": 75.75 ... 89.22
    t2 = seen[1]
    paper_ours = next(r for r in t2 if r["strategy"] == "paper: ours")
    assert [paper_ours[str(c)] for c in (30, 60, 90, 120, 150, 180)] == pytest.approx(
        [0.7575, 0.8308, 0.8562, 0.8697, 0.8794, 0.8922])


# ---- polyp_weighted_cluster.summary: the final mIoU beside the paper's at 180 labelled -------------------------
def test_pwc_summary_compares_with_the_papers_180_labelled_cell():
    run = types.SimpleNamespace(read_csv=lambda name: [{"miou_mean": "0.5"}, {"miou_mean": "0.75"}])
    own, tail = pwc.summary(run, types.SimpleNamespace(strategy="ours"))
    assert own == {"final_miou": 0.75, "paper_cvc_180": {"miou": 0.8922, "dice": 0.8891}} and tail == " miou 0.7500"
    own, _ = pwc.summary(run, types.SimpleNamespace(strategy="random"))
    assert own["paper_cvc_180"] == {"miou": 0.8709, "dice": 0.8636}
    own, _ = pwc.summary(run, types.SimpleNamespace(strategy="wo-dis"))   # Table 2 only: mIoU 86.51 %, no Dice
    assert own["paper_cvc_180"]["miou"] == pytest.approx(0.8651) and own["paper_cvc_180"]["dice"] is None


# ---- polyp_weighted_cluster.main: other data get the CVC-ClinicDB shares (30 initial, B = 30 of a 550 pool) ----
def test_pwc_other_data_take_the_cvc_shares_of_a_550_pool(monkeypatch, tmp_path):
    """Sec. 3.1 / Table 2: 30 initial and B = 30 of CVC-ClinicDB's 550 training images; a folder of another size
    gets the same shares (common.pool_share(n, 30, 550)): main() must hand split_data (30, 30, 550)."""
    seen = {}
    data = common.Data(np.zeros((20, 3, 8, 8), np.uint8), np.ones((20, 8, 8), np.uint8),
                       [f"im{i:03d}" for i in range(20)], {}, None, "folder")
    monkeypatch.setattr(common, "load_data", lambda *a, **k: data)

    def split_data(run, data, args, initial, query, paper_pool, **k):
        seen["shares"] = (initial, query, paper_pool)
        raise Stop

    monkeypatch.setattr(common, "split_data", split_data)
    with pytest.raises(Stop):
        pwc.main(["--data", "folder", "--data-dir", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "runs")])
    assert seen["shares"] == (30, 30, 550)
    # and what they give: a 110-image pool -> 6 initial and 6 per round
    assert common.pool_share(110, 30, 550) == 6


def test_pwc_kmeans_restarts_default_10():
    """--kmeans-init defaults to 10 restarts on every dataset, and the flag sets it."""
    assert pwc.parse_args([]).kmeans_init == 10
    assert pwc.parse_args(["--data", "cvc-clinicdb"]).kmeans_init == 10
    assert pwc.parse_args(["--kmeans-init", "3"]).kmeans_init == 3


# ---- dsal_fingerbones: summary, Spearman's nan rule, normalise's two-level case, main's normalisation ----------
def test_dsal_summary_by_hand():
    """rounds.csv's steps are cumulative (4, 7, 11): summary's steps is the last row's 11; fraction 30 / 40;
    mean_rho the nan-mean over the steps with a value: l (0.2, 0.3, 1.0) -> 0.5, m (0.2, nan, 0.4) -> 0.3,
    mean all nan -> None. The paper's numbers beside them."""
    rows = [dict(steps="4", labeled="10", rho_l_dsc="", rho_m_dsc="", rho_mean=""),
            dict(steps="7", labeled="20", rho_l_dsc="0.2", rho_m_dsc="0.2", rho_mean="nan"),
            dict(steps="9", labeled="25", rho_l_dsc="0.3", rho_m_dsc="nan", rho_mean="nan"),
            dict(steps="11", labeled="30", rho_l_dsc="1.0", rho_m_dsc="0.4", rho_mean="nan")]
    s = dsal.summary(types.SimpleNamespace(read_csv=lambda name: rows), 40)
    assert s["steps"] == 11 and s["training_set"] == 40 and s["fraction_labeled"] == pytest.approx(0.75)
    assert s["mean_rho"]["rho_l_dsc"] == pytest.approx(0.5)
    assert s["mean_rho"]["rho_m_dsc"] == pytest.approx(0.3)
    assert s["mean_rho"]["rho_mean"] is None
    assert s["paper"]["annotations_for_full_dice"] == 60 and s["paper"]["fraction_for_full_dice"] == 0.4316


def test_dsal_spearman_is_nan_when_either_holds_any_nan():
    assert math.isnan(dsal.spearman([float("nan"), 1, 2, 3], [1, 2, 3, 4]))
    assert math.isnan(dsal.spearman([1, 2, 3, 4], [4, 3, float("nan"), 1]))


def test_dsal_normalise_stretches_a_two_level_image():
    """minmax: (x - lo) 255 / (hi - lo): levels 3 and 4 -> 0 and 255 (only a constant image stays);
    histeq: CDF (2, 4) over levels 3, 4 -> (CDF - 2) / (4 - 2) 255 = 0, 255."""
    x = np.array([[[[3, 4], [3, 4]]]], np.uint8)
    assert dsal.normalise(x, "minmax")[0, 0].tolist() == [[0, 255], [0, 255]]
    assert dsal.normalise(x, "histeq")[0, 0].tolist() == [[0, 255], [0, 255]]


def test_dsal_paper_split_of_small_folders_keeps_one_val_and_one_test():
    """paper_split(n) = common.pool_share shares (at least 1 each): 209 -> 139/20/50, 4 images -> 2/1/1."""
    assert dsal.paper_split(209) == [139, 20, 50]
    assert dsal.paper_split(4) == [2, 1, 1]
    assert dsal.paper_split(100) == [66, 10, 24]  # 100 x 20 / 209 = 9.6, 100 x 50 / 209 = 23.9


def test_dsal_main_normalises_the_images_before_splitting(monkeypatch, tmp_path):
    """main() applies normalise(data.x, --normalise) to what it loads: minmax on a 2-level folder image."""
    seen = {}
    x = np.full((20, 1, 32, 32), 100, np.uint8)
    x[:, :, :16] = 110
    data = common.Data(x, np.ones((20, 32, 32), np.uint8), [f"h{i:03d}" for i in range(20)], {}, None, "folder")
    monkeypatch.setattr(common, "load_data", lambda *a, **k: data)

    def split(run, data, args):
        seen["x"] = data.x.copy()
        raise Stop

    monkeypatch.setattr(dsal, "split_and_steps", split)
    with pytest.raises(Stop):
        dsal.main(["--data", "folder", "--data-dir", str(tmp_path), "--image-size", "32", "--device", "cpu",
                   "--out", str(tmp_path / "runs")])
    assert set(np.unique(seen["x"]).tolist()) == {0, 255}


# ---- ssl_coldstart: the pre-trained weights that are returned and saved; the per-image min-max input -----------
def test_ssl_pretrain_returns_and_saves_the_trained_weights(monkeypatch, tmp_path):
    """pretrain() must return and write (ssl_weights.pt) the state of the network it trained: with
    common.train_epochs replaced by one that sets every float parameter to 0.25, every saved float tensor of the
    parameters is 0.25 (a fresh U-Net's random weights are not)."""
    args = S.parse_args(["--width", "4", "--image-size", "32", "--batch-size", "2", "--ssl-epochs", "1",
                         "--device", "cpu", "--out", str(tmp_path)])
    run = common.Run("ssl_coldstart.py", args, torch.device("cpu"))

    def train(model, opt, x, target, idx, epochs, batch_size, **k):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.25)
        return [(0, 0.125, 0.0)]  # one epoch

    monkeypatch.setattr(common, "train_epochs", train)
    x = torch.randint(0, 255, (6, 1, 32, 32), dtype=torch.uint8)
    state, losses, _ = S.pretrain(run, x, np.arange(4), [f"s{i}" for i in range(4)], args, torch.device("cpu"))
    names = {n for n, _ in S.ssl_unet(args).named_parameters()}
    assert losses == [0.125]
    assert all(torch.all(state[n] == 0.25) for n in names)
    saved = torch.load(run.path("ssl_weights.pt"), weights_only=False)
    assert all(torch.all(saved["state_dict"][n] == 0.25) for n in names)
    assert saved["pool"] == ["s0", "s1", "s2", "s3"] and saved["width"] == 4 and saved["image_size"] == 32


def test_ssl_prepare_data_min_max_normalises_each_image():
    """Sec. IV-A: every image min-max normalised, per image: (10, 20, 30, 60) -> (0, 51, 102, 255);
    (100, 110) -> (0, 255); a constant image -> 0."""
    x = np.array([[[[10, 20], [30, 60]]], [[[100, 110], [100, 110]]], [[[7, 7], [7, 7]]]], np.uint8)
    data = common.Data(x, np.zeros((3, 2, 2), np.uint8), ["a", "b", "c"], {}, None, "folder")
    out = S.prepare_data(data, types.SimpleNamespace(data="folder"))
    assert out.x.tolist() == [[[[0, 51], [102, 255]]], [[[0, 255], [0, 255]]], [[[0, 0], [0, 0]]]]
