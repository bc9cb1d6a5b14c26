"""dsal_fingerbones.py: the deeply supervised heads and Eq. 2 loss, the head-agreement score and both selection
directions on hand-made masks, Spearman's rank correlation (ties), intensity normalisation, the synthetic
finger bones, the Fig. 4 table on hand-made run folders (with its tolerance), main() with known scores (each
rule's picks), top_k's seeded tie-breaking, al_steps, --deterministic raising, the heads' nearest upsampling,
and the script end to end (synthetic under --deterministic, --resume, random, full with the AL run's steps,
--tables, a folder-layout fixture, bad input); Fig. 3's numbers and pool_scores.csv columns from known, distinct
proxies, and the folder protocol's 13 steps on 209 images."""
import csv
import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import dsal_fingerbones as dsal
import interface
from conftest import run_dir_from, run_script

TINY = ["--split", 40, 10, 10, "--image-size", 32, "--width", 4, "--initial", 10, "--query", 10, "--rounds", 2,
        "--epochs-initial", 2, "--epochs", 1, "--batch-size", 8]


def read(run, name):
    return list(csv.DictReader(open(os.path.join(run, name))))


# ------------------------------------------------------------------------------------ heads and the Eq. 2 loss
def test_heads_shapes_and_stages():
    model = dsal.build_model(1, types.SimpleNamespace(width=4, ds_stages=[0, 1]))
    final, aux = model(torch.zeros(2, 1, 32, 32))
    assert final.shape == (2, 1, 32, 32) and [a.shape for a in aux] == [(2, 1, 32, 32)] * 2  # upsampled to full size
    # lower = decoder stage 0 (8 x width channels, 1/8 resolution), middle = stage 1 (4 x width, 1/4)
    assert model.aux["0"].in_channels == 32 and model.aux["1"].in_channels == 16 and len(model.aux) == 2
    # heads() maps the model's aux list (by increasing stage) to (lower, middle, final) in flag order
    out = (torch.full((1,), 9.0), [torch.full((1,), 0.0), torch.full((1,), 1.0)])  # stage 0 -> 0, stage 1 -> 1
    assert [float(t) for t in dsal.heads(out, [0, 1])] == [0, 1, 9]
    assert [float(t) for t in dsal.heads(out, [1, 0])] == [1, 0, 9]                 # --ds-stages 1 0


def test_the_test_dice_of_a_deeply_supervised_model_is_the_final_heads():
    """Sec. IV: the segmentation is the final output; the heads only train and select. common.evaluate (every
    round's test Dice) and common.predict take the first of (final, [aux...]): a model whose final head gets the
    masks right and whose auxiliary heads predict nothing scores Dice 1."""
    y = np.zeros((3, 16, 16), np.uint8)
    y[:, 4:9, 2:12] = 1

    class Heads(torch.nn.Module):
        def forward(self, xb):
            final = (xb[:, :1] > 0).float() * 20 - 10  # the image holds the mask: +10 inside, -10 outside
            return final, [torch.full_like(final, -10.0), torch.full_like(final, -10.0)]
    x = torch.tensor(y[:, None] * 255)
    dice, iou = common.evaluate(Heads(), x, torch.tensor(y), np.arange(3), 2, torch.device("cpu"))
    assert dice.tolist() == [1.0] * 3 and iou.tolist() == [1.0] * 3
    assert torch.equal(common.predict(Heads(), x, np.arange(3), 2, torch.device("cpu")) > 0.5, torch.tensor(y) > 0)


def test_unet_has_the_authors_bottleneck_dropout_and_scores_without_it():
    """The authors' Keras U-Net (and Ronneberger et al.'s): Dropout(0.5) after the bottleneck while training, none
    elsewhere; the pool is scored with it off (get_unet_ds(dropout=False)), whatever mode the model was left in."""
    torch.manual_seed(0)
    model = dsal.build_model(1, types.SimpleNamespace(width=4, ds_stages=[0, 1]))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [model.bottleneck_drop] and drops[0].p == 0.5
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # training mode: the bottleneck dropout draws a new mask each pass
        assert not torch.equal(model(x)[0], model(x)[0])
    seen = []  # the dropout layer's mode at each call while the pool is scored
    model.bottleneck_drop.register_forward_pre_hook(lambda m, inputs: seen.append(m.training))
    xs = torch.randint(0, 255, (6, 1, 32, 32), dtype=torch.uint8)
    args = types.SimpleNamespace(batch_size=4, ds_stages=[0, 1], amp=False)
    model.train()
    dsal.score_pool(model, xs, None, np.arange(6), args, torch.device("cpu"))
    assert seen == [False, False]  # two batches, dropout off in both


def test_weighted_loss_hand_case():
    target = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    z = math.log(3)                                      # sigmoid(ln 3) = 0.75
    final = torch.zeros(1, 1, 2, 2)                      # p = 0.5: ln 2 per pixel
    lower = torch.full((1, 1, 2, 2), z)                  # p = 0.75
    middle = torch.full((1, 1, 2, 2), -z)                # p = 0.25
    L_f = math.log(2)
    L_l = (-math.log(0.75) - 3 * math.log(0.25)) / 4     # one foreground pixel, three background
    L_m = (-math.log(0.25) - 3 * math.log(0.75)) / 4
    out = (final, [lower, middle])
    assert dsal.ds_loss(out, target, [0, 1], [0.1, 0.3, 0.6]).item() == pytest.approx(0.1 * L_l + 0.3 * L_m + 0.6 * L_f)
    assert dsal.ds_loss(out, target, [0, 1], [0, 0, 1]).item() == pytest.approx(L_f)   # weights by flag
    assert dsal.ds_loss(out, target, [1, 0], [1, 0, 0]).item() == pytest.approx(L_m)   # stage 1 as the lower head
    # one logit z: BCE equals two-class cross-entropy over the logits [0, z]
    two_class = F.cross_entropy(torch.cat([torch.zeros_like(lower), lower], 1), target.long())
    assert two_class.item() == pytest.approx(L_l)
    with_dice = dsal.ds_loss(out, target, [0, 1], [0, 0, 1], dice=True).item()
    assert with_dice == pytest.approx(L_f + 0.5)          # soft Dice at p = 0.5: 1 - (1 + 1) / (2 + 1 + 1)


# --------------------------------------------------------------------------------- the score and the selection
class ThreeHeads(torch.nn.Module):
    """Channel 0 of the image is the final mask, channel 1 the lower head's, channel 2 the middle head's."""

    def __init__(self, scale=20):
        super().__init__()
        self.scale = scale  # logits +-scale/2; at 0.8 (p = 0.6 / 0.4) only the threshold p > 0.5 reads the masks

    def forward(self, x):
        z = (x - 0.5) * self.scale
        return z[:, 0:1], [z[:, 1:2], z[:, 2:3]]


def test_score_and_both_selection_directions():
    final = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    lower = [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]   # L-DSC: 1, 2*1/(1+4) = 0.4, empty vs empty = 1
    middle = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]  # M-DSC: 2/3, 2*2/(2+4) = 2/3, 0
    gt = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]      # R-DSC: 2/3, 1, 1
    x = torch.tensor(np.array([final, lower, middle], np.uint8) * 255).permute(1, 0, 2)[:, :, None]  # (3, 3, 1, 4)
    y = torch.tensor(np.array(gt, np.uint8))[:, None]                                                # (3, 1, 4)
    args = types.SimpleNamespace(batch_size=2, amp=False, ds_stages=[0, 1])
    for scale in (20, 0.8):  # Sec. III-B binarises at p > 0.5, also for heads unsure of every pixel
        s = dsal.score_pool(ThreeHeads(scale), x, y, np.array([0, 1, 2]), args, torch.device("cpu"))
        assert s["l_dsc"].tolist() == pytest.approx([1, 0.4, 1])
        assert s["m_dsc"].tolist() == pytest.approx([2 / 3, 2 / 3, 0])
        assert s["score"].tolist() == pytest.approx([5 / 6, (0.4 + 2 / 3) / 2, 0.5])
        assert s["r_dsc"].tolist() == pytest.approx([2 / 3, 1, 1])
    pool = np.array([10, 11, 12])
    assert dsal.select(pool, s["score"], 2, "highest").tolist() == [10, 11]   # Sec. III-B: the largest mean
    assert dsal.select(pool, s["score"], 2, "lowest").tolist() == [12, 11]    # the authors' later code
    assert dsal.select(pool, [0.5, 0.9, 0.5], 2, "lowest").tolist() == [10, 12]  # no rng: ties keep pool order
    # --ds-stages 1 0 swaps the lower and middle heads
    s = dsal.score_pool(ThreeHeads(), x, y, np.array([0, 1, 2]), types.SimpleNamespace(batch_size=3, amp=False,
                        ds_stages=[1, 0]), torch.device("cpu"))
    assert s["l_dsc"].tolist() == pytest.approx([2 / 3, 2 / 3, 0])


# ------------------------------------------------------------------------------------- Spearman (numpy only)
def test_spearman_hand_cases_with_ties():
    assert dsal.rank_average([3, 1, 3, 2]).tolist() == [3.5, 1, 3.5, 2]
    assert dsal.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert dsal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) with d = (-1, 1, -1, 1, 0): 1 - 24 / 120
    assert dsal.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties: ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert dsal.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(dsal.spearman([1, 1, 1], [1, 2, 3]))  # a constant proxy has no rank correlation


# --------------------------------------------------------------------------------------------------- data
def test_normalise_hand_cases():
    x = np.array([[[[10, 20, 30, 10]]], [[[0, 0, 1, 2]]], [[[7, 7, 7, 7]]]], np.uint8)
    assert dsal.normalise(x, "minmax")[:, 0, 0].tolist() == [[0, 128, 255, 0], [0, 0, 128, 255], [7, 7, 7, 7]]
    # histogram equalisation: image 2's CDF = (2, 3, 4) -> (CDF - 2) / (4 - 2) x 255 = (0, 127.5, 255)
    assert dsal.normalise(x, "histeq")[1, 0, 0].tolist() == [0, 0, 128, 255]
    assert dsal.normalise(x, "histeq")[2, 0, 0].tolist() == [7, 7, 7, 7]   # constant: unchanged
    assert dsal.normalise(x, "none") is x


def interior(y, r=2):
    """Fraction of mask pixels whose whole (2r+1)^2 neighbourhood is mask: near 0 for thin shapes."""
    y = y.astype(bool)
    out = y.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(y, (dy, dx), (1, 2))
    return out.sum() / max(1, y.sum())


def test_synthetic_finger_bones_are_thin_deterministic_and_varied():
    d = dsal.make_fingerbones(40, 128, seed=3)
    assert d.x.shape == (40, 1, 128, 128) and d.x.dtype == np.uint8 and d.y.shape == (40, 128, 128)
    assert set(np.unique(d.y)) == {0, 1} and len(set(d.ids)) == 40
    again, other = dsal.make_fingerbones(40, 128, seed=3), dsal.make_fingerbones(40, 128, seed=4)
    assert (again.x == d.x).all() and (again.y == d.y).all() and not (other.y == d.y).all()
    frac = d.y.reshape(40, -1).mean(1)
    assert frac.min() > 0.01 and frac.max() < 0.2          # every hand has bones; bones are a small part
    lesions = common.make_synthetic(40, 128, 1, seed=3)
    assert interior(d.y) < 0.1 < 0.5 < interior(lesions.y)  # thin bones, unlike the shared lesion generator
    assert {"normal", "low-contrast", "duplicate"} <= set(d.kinds)
    assert len(np.unique(d.x.reshape(40, -1).mean(1).round())) > 20  # exposure varies from image to image


def test_main_fine_tunes_one_model_with_the_weighted_heads(monkeypatch, tmp_path):
    """Sec. III: every step fine-tunes the same model with the same optimiser on all labelled images, with Eq. 2's
    loss at the flags' weights (lower / middle / final = --ds-weights, heads at --ds-stages)."""
    calls = []

    def train(model, opt, x, y, idx, epochs, batch_size, *, loss_fn, **k):
        calls.append((model, opt, len(idx), loss_fn))
        return [(e, 0.0, 0.0) for e in range(epochs)]

    monkeypatch.setattr(common, "train_epochs", train)
    dsal.main(["--device", "cpu", *map(str, TINY), "--ds-weights", "0.2", "0.5", "0.9", "--out", str(tmp_path)])
    assert [n for *_, n, _ in calls] == [10, 20, 30]
    assert all(m is calls[0][0] and o is calls[0][1] for m, o, _, _ in calls)  # never rebuilt
    final, lower, middle = (torch.randn(2, 1, 4, 4) for _ in range(3))
    t = (torch.rand(2, 4, 4) > 0.5).to(torch.uint8)
    bce = lambda z: F.binary_cross_entropy_with_logits(z[:, 0], t.float())
    want = 0.2 * bce(lower) + 0.5 * bce(middle) + 0.9 * bce(final)
    assert calls[0][3]((final, [lower, middle]), t).item() == pytest.approx(want.item(), rel=1e-6)


def test_default_ds_weights_weigh_lower_middle_final_as_eq_2(monkeypatch):
    """Eq. 2, Sec. III-A: L = 0.1 L_l + 0.3 L_m + 0.6 L_f by default, the lower head (after decoder stage 0, the
    lowest resolution) weighed least and the final head most; the same weights with Eq. 1's cross-entropy alone
    and with --loss ce+dice (a stub per-head loss: the logits' mean)."""
    args = dsal.parse_args(["--data", "folder", "--data-dir", "."])
    assert args.ds_weights == [0.1, 0.3, 0.6] and args.ds_stages == [0, 1]
    const = lambda v: torch.full((1, 1, 2, 2), float(v))
    out = (const(100), [const(1), const(10)])                 # final, [stage 0 (lower), stage 1 (middle)]
    monkeypatch.setattr(common, "bce_dice_loss", lambda logits, target: logits.mean())
    loss = dsal.ds_loss(out, torch.zeros(1, 2, 2), args.ds_stages, args.ds_weights, dice=True)
    assert loss.item() == pytest.approx(0.1 * 1 + 0.3 * 10 + 0.6 * 100)
    sp = lambda z: math.log1p(math.exp(z))                    # BCE of logit z against background: softplus(z)
    out = (const(3), [const(-1), const(1)])
    loss = dsal.ds_loss(out, torch.zeros(1, 2, 2), args.ds_stages, args.ds_weights)
    assert loss.item() == pytest.approx(0.1 * sp(-1) + 0.3 * sp(1) + 0.6 * sp(3), rel=1e-6)


# ------------------------------------------------------------------------------- Fig. 4 table, hand-made runs
def fake_run(root, name, strategy, select, seed, curve, split=(100, 10, 10), finished=True, **flags):
    run = root / name
    run.mkdir(parents=True)
    args = {"data": "synthetic", "strategy": strategy, "select": select, "seed": seed, "split": list(split), **flags}
    (run / "config.json").write_text(json.dumps({"script": "dsal_fingerbones", "args": args}))
    if finished:
        (run / "summary.json").write_text("{}")
    with open(run / "rounds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["round", "labeled", "pseudo", "dice_mean", "dice_std", "iou_mean", "train_s",
                               "select_s", "rho_mean"])
        w.writeheader()
        for k, (n, dice) in enumerate(curve):
            w.writerow({"round": k, "labeled": n, "pseudo": 0, "dice_mean": dice, "dice_std": 0, "iou_mean": 0,
                        "train_s": 0, "select_s": 0, "rho_mean": "" if k == 0 else 0.5})


def test_tables_on_hand_made_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "full", "full", "highest", 0, [(100, 0.80)])
    fake_run(runs, "ds0", "dsal", "highest", 0, [(10, 0.5), (20, 0.78), (30, 0.79)])
    fake_run(runs, "ds1", "dsal", "highest", 1, [(10, 0.5), (20, 0.84), (30, 0.90)])  # mean at 20: 0.81 >= 0.80
    fake_run(runs, "rnd", "random", "highest", 0, [(10, 0.5), (20, 0.6), (30, 0.795)])  # within 0.01 at 30
    fake_run(runs, "low", "dsal", "lowest", 0, [(10, 0.5), (20, 0.7), (30, 0.8)])
    fake_run(runs, "crashed", "dsal", "lowest", 1, [(10, 0.1)], finished=False)  # no summary.json: left out
    other = tmp_path / "other" / "x"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"script": "ceal_mcdropout", "args": {}}))
    out = dsal.main(["--tables", str(runs), str(tmp_path / "other"), "--out", str(tmp_path / "t")])
    assert out == str(tmp_path / "t" / "dsal_fingerbones_tables")
    table = open(tmp_path / "t" / "dsal_fingerbones_tables" / "fig4.md").read()
    assert "| synthetic | dsal-highest | 2 | 0.8000 | 20 | 20.00% | 0.8450 |" in table   # reached at 20 of 100
    assert "| synthetic | dsal-lowest | 1 | 0.8000 | 30 | 30.00% | 0.8000 |" in table    # >= counts as reached
    assert "| synthetic | random | 1 | 0.8000 | 30 | 30.00% | 0.7950 |" in table   # 0.795 >= 0.80 - 0.01
    assert "within 0.01 (--reach-tolerance" in table
    assert "| synthetic | dsal-highest | 20 | 2 | 0.8100 ± 0.0424 |" in table  # mean ± sample std (0.03 x sqrt 2)
    assert "ceal" not in table and os.path.isfile(tmp_path / "t" / "dsal_fingerbones_tables" / "fig4_curve.png")
    assert "from 5 runs" in capsys.readouterr().out and not os.path.exists(runs / "full" / "checkpoint.pt")
    strict = open(os.path.join(dsal.main(["--tables", str(runs), "--reach-tolerance", "0", "--out",
                                          str(tmp_path / "s")]), "fig4.md")).read()
    assert "| synthetic | random | 1 | 0.8000 | not reached | - | 0.7950 |" in strict
    assert "| synthetic | dsal-lowest | 1 | 0.8000 | 30 | 30.00% | 0.8000 |" in strict
    (tmp_path / "file").write_text("")  # --out a file: was a NotADirectoryError traceback
    with pytest.raises(common.UserError, match=f"--out {tmp_path / 'file' / 'dsal_fingerbones_tables'}: cannot "
                                               f"write fig4.md and its figures there"):
        dsal.main(["--tables", str(runs), "--out", str(tmp_path / "file")])
    with pytest.raises(common.UserError, match="nowhere: no such folder"):
        dsal.main(["--tables", str(tmp_path / "nowhere")])
    with pytest.raises(common.UserError, match="no finished dsal_fingerbones runs"):
        dsal.main(["--tables", str(tmp_path / "other")])
    # a run of another schedule, at counts no other run has: not one more point of the dsal-highest curve
    fake_run(runs, "q5", "dsal", "highest", 2, [(15, 0.6), (25, 0.9)], query=5)
    with pytest.raises(common.UserError, match=r"the synthetic runs follow 2 schedules; a table compares the methods "
                                               r"under one: give the folders of one schedule\n  --query 5: e\.g\. "):
        dsal.main(["--tables", str(runs), "--out", str(tmp_path / "q")])


# ------------------------------------------------------------------------------------------------ end to end
def assert_rule_followed(run, rule):
    """Each round's 10 queried images score at least as high (or low) as every image left in the pool, by
    the logged mean agreement (written to 6 digits, hence the tolerance). On the tiny runs every score may be
    equal (a barely trained model): test_main_picks_follow_the_rule_on_known_scores checks the rule itself."""
    scores, queried = read(run, "pool_scores.csv"), read(run, "queried.csv")
    assert {r["round"] for r in scores} == {"1", "2"}
    for rnd in ("1", "2"):
        rows = [r for r in scores if r["round"] == rnd]
        asked = {q["sample_id"] for q in queried if q["round"] == rnd}
        assert len(asked) == 10 and asked == {r["sample_id"] for r in rows if r["picked"] == f"oracle-dsal-{rule}"}
        sign = 1 if rule == "highest" else -1
        chosen = [sign * float(r["mean"]) for r in rows if r["sample_id"] in asked]
        left = [sign * float(r["mean"]) for r in rows if r["sample_id"] not in asked]
        assert min(chosen) >= max(left) - 1e-5


def test_end_to_end_resume_rules_baselines_and_tables(tmp_path):
    # --deterministic: on the CPU path no op lacks a deterministic implementation (torch would raise)
    full = run_dir_from(run_script("dsal_fingerbones.py", *TINY, "--deterministic", "--out", tmp_path / "a"))
    rows = read(full, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == [10, 20, 30] and [int(r["pool_left"]) for r in rows] == [30, 20, 10]
    for c in ("rho_l_dsc", "rho_m_dsc", "rho_mean", "pool_dice", "queried_dice", "val_dice"):
        assert c in rows[0]
    assert rows[0]["rho_mean"] == "" and rows[1]["pool_scored"] == "30" and rows[2]["pool_scored"] == "20"
    assert_rule_followed(full, "highest")
    q = read(full, "queried.csv")
    assert {r["how"] for r in q} == {"initial", "oracle-dsal-highest"} and len({r["sample_id"] for r in q}) == 30
    assert [r["round"] for r in q if r["how"] == "initial"] == ["0"] * 10
    assert {r["sample_id"] for r in q} <= set(json.load(open(os.path.join(full, "splits.json")))["train"])
    for f in ("summary.json", "learning_curve.png", "panel.png", "fig3_scatter.png", "fig3_ranks.png", "fig3_rho.png",
              "checkpoint.pt", "epochs.csv", "picks/round_0.png", "picks/round_1.png", "picks/round_2.png"):
        assert os.path.isfile(os.path.join(full, f)), f
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["final_dice"] == pytest.approx(float(rows[-1]["dice_mean"]), abs=1e-5)
    # Fig. 3 in rounds.csv is the Spearman correlation of the logged pool scores
    scores = [r for r in read(full, "pool_scores.csv") if r["round"] == "1"]
    rho = dsal.spearman([float(r["r_dsc"]) for r in scores], [float(r["mean"]) for r in scores])
    logged = float(rows[1]["rho_mean"])
    assert (math.isnan(rho) and math.isnan(logged)) or logged == pytest.approx(rho, abs=1e-5)

    # interrupted after round 1, then --resume: the same queries and the same results
    out = run_script("dsal_fingerbones.py", *TINY, "--deterministic", "--out", tmp_path / "b", check=False,
                     env_extra={"ALSEG_STOP_AFTER_ROUND": "1"})
    assert out.returncode == 3
    part = os.path.join(tmp_path / "b", os.listdir(tmp_path / "b")[0])
    resumed = run_dir_from(run_script("dsal_fingerbones.py", "--resume", part))
    assert resumed == part and read(resumed, "queried.csv") == q
    assert [r["dice_mean"] for r in read(resumed, "rounds.csv")] == [r["dice_mean"] for r in rows]
    assert read(resumed, "pool_scores.csv") == read(full, "pool_scores.csv")

    # the later code's rule, random and full annotation (in this process: the command line is under test above)
    here = lambda *a: dsal.main(["--device", "cpu", *map(str, TINY), *map(str, a), "--out", str(tmp_path / "a")])
    low = here("--select", "lowest")
    assert_rule_followed(low, "lowest")
    rnd = here("--strategy", "random")
    assert {r["how"] for r in read(rnd, "queried.csv")} == {"initial", "oracle-random"}
    assert read(rnd, "queried.csv") != q and read(rnd, "rounds.csv")[1]["rho_mean"] != ""  # Fig. 3 for random too
    whole = here("--strategy", "full")
    assert [int(r["labeled"]) for r in read(whole, "rounds.csv")] == [40]
    assert len(read(whole, "queried.csv")) == 40 and {r["how"] for r in read(whole, "queried.csv")} == {"full"}
    # the AL run's optimiser steps: 2 x ceil(10/8) + ceil(20/8) + ceil(30/8) = 11 = 2 epochs of 5 + 1 step
    assert [r["steps"] for r in rows] == ["4", "7", "11"] and read(whole, "rounds.csv")[0]["steps"] == "11"
    assert len(read(whole, "epochs.csv")) == 3

    interface.assert_interface("dsal_fingerbones.py", [full, resumed, low, rnd, whole])

    # Fig. 4 from these runs: the table names every method and trains nothing
    table = open(os.path.join(dsal.main(["--tables", str(tmp_path / "a"), "--out", str(tmp_path / "t")]), "fig4.md")).read()
    for method in ("dsal-highest", "dsal-lowest", "random", "full"):
        assert f"| synthetic | {method} |" in table


def folder_fixture(root, n=16, size=40):
    """Hand-made radiograph-like PNGs in images/ and masks with the `_mask` suffix in masks/."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        mask = np.zeros((size, size), np.uint8)
        for c in rng.choice(np.arange(4, size - 4), 3, replace=False):  # three vertical "bones"
            mask[rng.integers(2, 10): rng.integers(28, 38), c: c + 2] = 1
        img = 40 + 60 * mask + rng.normal(0, 8, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"hand{k:02d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"hand{k:02d}_mask.png")
    return root


def test_folder_layout_end_to_end_and_bad_input(tmp_path):
    root = folder_fixture(tmp_path / "bones")
    args = ["--data", "folder", "--data-dir", root, "--split", 8, 4, 4, "--image-size", 32, "--width", 4,
            "--initial", 4, "--query", 2, "--epochs-initial", 1, "--epochs", 1, "--batch-size", 4]
    run = run_dir_from(run_script("dsal_fingerbones.py", *args, "--out", tmp_path / "runs"))
    rows = read(run, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == [4, 6, 8]  # the default --rounds: until the 8 are used up
    splits = json.load(open(os.path.join(run, "splits.json")))
    assert sorted(sum(splits.values(), [])) == [f"hand{k:02d}" for k in range(16)]
    assert json.load(open(os.path.join(run, "config.json")))["args"]["normalise"] == "minmax"

    def fails(*a):
        out = run_script("dsal_fingerbones.py", *a, "--out", tmp_path / "runs", check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        return out.stderr
    os.remove(root / "masks" / "hand03_mask.png")
    assert "hand03.png: no mask for this image" in fails(*args)
    for flags, message in ((["--image-size", "600"], "--image-size 600: expected a multiple of 16, at least 32 .*the "
                                                     "nearest are 592 and 608"),
                           (["--ds-stages", "1", "1"], "--ds-stages 1 1: expected two different decoder stages"),
                           (["--ds-weights", "0", "0", "0"], "expected three non-negative weights")):
        with pytest.raises(common.UserError, match=message):
            dsal.parse_args(flags)


# ------------------------------------------------------------- main() with known scores: the rule picks, no ties
N_DATA = 60                                                   # TINY: 40 / 10 / 10, ids hand0000 ... hand0059
KNOWN = (np.random.default_rng(7).permutation(N_DATA) + 1) / (N_DATA + 1)  # distinct known agreements in (0, 1)


def known_scores(model, x, y, pool, args, device):
    """dsal.score_pool replaced: image i's mean agreement is KNOWN[i] (its two terms too); R-DSC reversed."""
    pool = np.asarray(pool)
    return {"score": KNOWN[pool], "l_dsc": KNOWN[pool], "m_dsc": KNOWN[pool], "r_dsc": 1 - KNOWN[pool]}


@pytest.mark.parametrize("rule", ["highest", "lowest"])
def test_main_picks_follow_the_rule_on_known_scores(rule, tmp_path, monkeypatch):
    """Every step queries the 10 pool images of largest (Sec. III-B) or lowest (--select lowest) known agreement,
    and pool_scores.csv holds those scores with the picks."""
    monkeypatch.setattr(dsal, "score_pool", known_scores)
    run = dsal.main(["--device", "cpu", *map(str, TINY), "--select", rule, "--out", str(tmp_path)])
    q = read(run, "queried.csv")
    picks = {r: sorted(int(e["sample_id"][4:]) for e in q if e["round"] == str(r)) for r in range(3)}
    train = [int(sid[4:]) for sid in json.load(open(os.path.join(run, "splits.json")))["train"]]
    labelled = set(picks[0])
    for rnd in (1, 2):
        pool = [i for i in train if i not in labelled]
        want = sorted(pool, key=lambda i: -KNOWN[i] if rule == "highest" else KNOWN[i])[:10]
        assert picks[rnd] == sorted(want), (rnd, picks[rnd], sorted(want))
        labelled |= set(want)
    rows = read(run, "pool_scores.csv")
    assert len(rows) == 30 + 20
    for r in rows:
        i = int(r["sample_id"][4:])
        assert float(r["mean"]) == pytest.approx(KNOWN[i], abs=1e-6)
        assert (r["picked"] == f"oracle-dsal-{rule}") == (i in picks[int(r["round"])])
    rho = [float(r["rho_mean"]) for r in read(run, "rounds.csv")[1:]]
    assert rho == pytest.approx([-1, -1])  # R-DSC = 1 - score: Fig. 3's rank correlation from the logged scores


def test_top_k_ties_drawn_from_the_seeded_generator():
    pool, scores = np.arange(100, 120), np.zeros(20)
    scores[[3, 17]] = 1                                        # two clear winners, then an 18-way tie for 3 places
    assert common.top_k(pool, scores, 5).tolist() == [103, 117, 100, 101, 102]  # no rng: the lowest positions
    a = common.top_k(pool, scores, 5, rng=np.random.default_rng(0))
    assert sorted(a[:2].tolist()) == [103, 117] and len(set(a.tolist())) == 5   # the winners first, then 3 tied
    assert a.tolist() == common.top_k(pool, scores, 5, rng=np.random.default_rng(0)).tolist()  # seeded: repeatable
    draws = {tuple(sorted(common.top_k(pool, scores, 5, rng=np.random.default_rng(s))[2:].tolist())) for s in range(8)}
    assert len(draws) > 1                                      # the tied places vary with the seed
    low = common.top_k(pool, -scores, 2, largest=False, rng=np.random.default_rng(1))
    assert sorted(low.tolist()) == [103, 117]                  # largest=False: the smallest of -scores


def test_al_steps_and_the_full_baseline_budget():
    a = types.SimpleNamespace(strategy="full", initial=10, query=10, rounds=13, epochs_initial=50, epochs=10,
                              batch_size=8)
    # the paper's folder protocol, 139 training images: 50 x 2 + 10 x (3+4+5+7+8+9+10+12+13+14+15+17+18) = 1450
    # (the former full baseline, 180 epochs x ceil(139/8) = 3240 steps, was 2.2 x that): 1450 / 18 -> 81 epochs
    assert common.ceiling(a, 139) == (0, 81, 100 + 10 * 135) and 100 + 10 * 135 == 1450
    b = types.SimpleNamespace(strategy="full", initial=10, query=10, rounds=2, epochs_initial=2, epochs=1, batch_size=8)
    assert common.ceiling(b, 40)[2] == 2 * 2 + 3 + 4                # TINY
    b.rounds = 20                                                    # more steps than the pool allows: stops at 40
    assert common.ceiling(b, 40)[2] == 2 * 2 + 3 + 4 + 5
    b.strategy = "dsal"                                              # not the ceiling: the flags' schedule
    assert common.ceiling(b, 40) == (20, 2, None)


def test_deterministic_flag_fails_loudly_and_switches_off():
    try:
        common.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()   # raise, not warn
        common.seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_deep_supervision_heads_upsample_by_nearest():
    """The authors' Keras UpSampling2D is nearest-neighbour (and bilinear's CUDA backward is not deterministic):
    the lower head (stage 0, 1/8 resolution) is constant on every 8 x 8 block, the middle one on 4 x 4 blocks."""
    torch.manual_seed(0)
    model = dsal.build_model(1, types.SimpleNamespace(width=4, ds_stages=[0, 1])).eval()
    with torch.no_grad():
        _, (lower, middle) = model(torch.rand(2, 1, 32, 32))
    for z, k in ((lower, 8), (middle, 4)):
        blocks = z.reshape(2, 32 // k, k, 32 // k, k)
        assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks)) and z.std() > 0


# ------------------------------------------------------ Fig. 3 and the paper's step count, hand-made (audit tests)
def test_spearman_is_a_rank_correlation_not_pearsons():
    """Fig. 3 ranks: any increasing function of R-DSC has rho 1 (Pearson's r of these values is 0.82)."""
    assert dsal.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1)
    assert dsal.spearman([0.1, 0.2, 0.3, 0.9], [0.9, 0.8, 0.7, 0.0]) == pytest.approx(-1)


@pytest.mark.parametrize("rule", ["highest", "lowest"])
def test_fig3_numbers_and_pool_scores_from_each_proxys_own_column(rule, tmp_path, monkeypatch):
    """query() with known pool scores whose three proxies differ (score_pool replaced): rho_l_dsc, rho_m_dsc and
    rho_mean are Spearman's rho of R-DSC with L-DSC, M-DSC and the mean; pool_dice, queried_dice and
    queried_score the pool's and the picks' means; pool_scores.csv holds every proxy in its own column."""
    r = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    known = {"score": np.array([0.3, 0.9, 0.1, 0.8, 0.2, 0.4]),  # ranks 3 6 1 5 2 4: rho = 1 - 6 x 38 / 210
             "l_dsc": r ** 4,                                     # increasing in R-DSC, not linearly: rho 1
             "m_dsc": 1 - r,                                      # decreasing: rho -1
             "r_dsc": r}                                          # each ranks the pool its own way
    monkeypatch.setattr(dsal, "score_pool", lambda model, x, y, pool, args, device: known)
    monkeypatch.setattr(common, "save_picks", lambda *a, **k: None)
    args = types.SimpleNamespace(resume=None, out=str(tmp_path), data="synthetic", strategy="dsal", seed=0,
                                 select=rule, query=2, batch_size=8, amp=False)
    run = common.Run("dsal_fingerbones.py", args, torch.device("cpu"))
    data = types.SimpleNamespace(ids=[f"hand{i:04d}" for i in range(6)])
    new, how, fig3 = dsal.query(run, 1, None, data, None, None, np.arange(6), args, "cpu", np.random.default_rng(0))
    want = [1, 3] if rule == "highest" else [2, 4]                # the mean's two largest / lowest, no proxy's
    assert sorted(new.tolist()) == want and how == f"oracle-dsal-{rule}"
    assert fig3["rho_l_dsc"] == pytest.approx(1) and fig3["rho_m_dsc"] == pytest.approx(-1)
    assert fig3["rho_mean"] == pytest.approx(1 - 228 / 210) and fig3["pool_scored"] == 6
    assert fig3["pool_dice"] == pytest.approx(r.mean()) and fig3["queried_dice"] == pytest.approx(r[want].mean())
    assert fig3["queried_score"] == pytest.approx(known["score"][want].mean())
    rows = read(run.dir, "pool_scores.csv")
    assert [int(row["sample_id"][4:]) for row in rows] == list(range(6))
    for column, key in (("mean", "score"), ("l_dsc", "l_dsc"), ("m_dsc", "m_dsc"), ("r_dsc", "r_dsc")):
        assert [float(row[column]) for row in rows] == pytest.approx(known[key].tolist(), abs=1e-6), column
    assert [k for k, row in enumerate(rows) if row["picked"] == how] == want


def test_query_breaks_ties_with_the_runs_generator(tmp_path, monkeypatch):
    """The agreement is often exactly 1 for many images: query() passes the run's generator to select(), so
    tied images are drawn in a seeded order, not taken in pool order (the lowest ids)."""
    tied = {k: np.ones(20) for k in ("score", "l_dsc", "m_dsc", "r_dsc")}
    monkeypatch.setattr(dsal, "score_pool", lambda model, x, y, pool, args, device: tied)
    monkeypatch.setattr(common, "save_picks", lambda *a, **k: None)
    args = types.SimpleNamespace(resume=None, out=str(tmp_path), data="synthetic", strategy="dsal", seed=0,
                                 select="highest", query=3, batch_size=8, amp=False)
    run, pool = common.Run("dsal_fingerbones.py", args, torch.device("cpu")), np.arange(100, 120)
    data = types.SimpleNamespace(ids=[f"hand{i:04d}" for i in range(120)])
    picks = set()
    for seed in range(4):
        new = dsal.query(run, seed + 1, None, data, None, None, pool, args, "cpu", np.random.default_rng(seed))[0]
        assert new.tolist() == common.top_k(pool, tied["score"], 3, rng=np.random.default_rng(seed)).tolist()
        picks.add(tuple(sorted(new.tolist())))
    assert len(picks) > 1 and (100, 101, 102) not in picks


def test_folder_of_209_gives_the_papers_split_and_13_steps(tmp_path):
    """Sec. IV-A on a folder of 209 images: 139 / 20 / 50, 10 initial, +10 per step, and steps until the 139 are
    used up: 10 + 12 x 10 + a last step of 9 = 13 steps (a floor would leave 9 images never queried)."""
    args = dsal.parse_args(["--data", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "runs")])
    data = common.Data(np.zeros((209, 1, 4, 4), np.uint8), np.ones((209, 4, 4), np.uint8),
                       [f"hand{i:03d}" for i in range(209)], {}, None, "folder")
    run = common.Run("dsal_fingerbones.py", args, torch.device("cpu"))
    train, val, test = dsal.split_and_steps(run, data, args)
    assert (len(train), len(val), len(test)) == (139, 20, 50)
    assert (args.initial, args.query, args.rounds) == (10, 10, 13)
    assert json.load(open(run.path("config.json")))["args"]["rounds"] == 13
