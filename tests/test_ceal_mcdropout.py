"""ceal_mcdropout.py: the four CEAL groups on hand-made scores (both readings of the band and of the pseudo
group), main() with a known score checked against the rule from the run folder, and the script end to end
(synthetic, the real LGG sample files, --resume, seeding, strategies, bad input)."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ceal_mcdropout
import common
import interface
from conftest import REAL, run_dir_from, run_script
from unet import UNet

TINY = ["--split", 40, 10, 10, "--image-size", 32, "--width", 4, "--initial", 10, "--query", 7, "--rounds", 2,
        "--epochs-initial", 1, "--epochs", 1, "--batch-size", 8, "--mc-passes", 3, "--pseudo-step", 2]


def test_ceal_groups_on_hand_made_scores():
    # 100 scores: a pile at 1.0 (the confident mode), a spread of higher ones, two near-zero (missed lesions)
    scores = np.concatenate([[0.01, 0.02], np.full(60, 1.0) + np.linspace(0, 0.01, 60), np.linspace(2, 9, 38)])
    rng = np.random.default_rng(0)
    low, high, band, pseudo = common.ceal_groups(scores, 2, 3, 4, 5, rng)
    assert sorted(low) == [0, 1]                       # group 1: the lowest scores
    assert sorted(high) == [97, 98, 99]                # group 2: the highest scores
    counts, edges = np.histogram(scores, 80)
    mode = np.argmax(counts)
    assert all(scores[band] <= edges[mode + 7])        # group 3: random, within the low band
    assert all(0.99 <= scores[pseudo]) and all(scores[pseudo] <= 1.02)  # group 4: at the histogram's mode
    every = np.concatenate([low, high, band, pseudo])
    assert len(set(every)) == len(every) == 14         # groups never overlap
    again = common.ceal_groups(scores, 2, 3, 4, 5, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip((low, high, band, pseudo), again))


def test_ceal_groups_band_and_pseudo_readings_by_hand():
    # 80 bins of width 0.1 over [0, 8]: 0 and 8 fix the range. The mode is bin 20 (2.0 <= s < 2.1, 6 scores).
    scores = np.array([0.0, 0.05,                                # 0, 1: the two lowest
                       2.01, 2.03, 2.05, 2.06, 2.08, 2.09,       # 2-7: the mode bin 20
                       1.5, 2.55, 2.65, 2.72,                    # 8: below the mode; 9-11: bins 25, 26, 27
                       3.0, 4.0, 4.65, 4.75,                     # 12-15: bins 30, 40, 46, 47
                       7.9, 8.0])                                # 16, 17: the two highest
    counts, edges = np.histogram(scores, 80)
    assert np.argmax(counts) == 20 and np.isclose(edges[1] - edges[0], 0.1)
    everything = set(range(len(scores)))
    # paper: every score up to the upper edge of bin 20 + 6 = 2.7, mode bin and below included
    low, high, band, pseudo = common.ceal_groups(scores, 2, 2, 9, 0, np.random.default_rng(0))
    assert set(low) == {0, 1} and set(high) == {16, 17}
    assert set(band) == {2, 3, 4, 5, 6, 7, 8, 9, 10}             # all 9 candidates: 2.72 (bin 27) is out
    # reference: from the lower edge of bin 26 (2.6) to the lower edge of bin 47 (4.7)
    _, _, band, _ = common.ceal_groups(scores, 2, 2, 5, 0, np.random.default_rng(0), band="reference")
    assert set(band) == {10, 11, 12, 13, 14}                     # 2.65, 2.72, 3.0, 4.0, 4.65; not 2.55, 4.75
    _, _, band, _ = common.ceal_groups(scores, 2, 2, 7, 0, np.random.default_rng(0), band="reference")
    assert set(band) == {10, 11, 12, 13, 14, 8, 2}               # 5 in the band + the 2 next-lowest (1.5, 2.01)
    # pseudo, nearest: the closest to the mode bin's centre 2.05, deterministic
    _, _, band, pseudo = common.ceal_groups(scores, 2, 2, 0, 4, np.random.default_rng(0))
    assert list(pseudo[:1]) == [4] and set(pseudo) == {3, 4, 5, 6}   # |s - 2.05| = 0, .01, .02, .02
    _, _, _, pseudo = common.ceal_groups(scores, 2, 2, 0, 8, np.random.default_rng(0))
    assert set(pseudo) == {2, 3, 4, 5, 6, 7, 8, 9}               # beyond the bin: 2.55 (.5) and 1.5 (.55)
    # pseudo, reference: random inside the mode bin only, fewer when it holds fewer
    _, _, _, pseudo = common.ceal_groups(scores, 2, 2, 0, 4, np.random.default_rng(0), pseudo="reference")
    assert len(pseudo) == 4 and set(pseudo) <= {2, 3, 4, 5, 6, 7}
    draws = {tuple(sorted(common.ceal_groups(scores, 2, 2, 0, 4, np.random.default_rng(s), pseudo="reference")[3]))
             for s in range(20)}
    assert len(draws) > 1                                        # random, not the nearest four
    _, _, _, pseudo = common.ceal_groups(scores, 2, 2, 0, 8, np.random.default_rng(0), pseudo="reference")
    assert set(pseudo) == {2, 3, 4, 5, 6, 7}
    two_more = np.r_[scores, 2.12, 2.15]  # 18, 19 in bin 21, next to the mode bin: never a reference pseudo-label
    assert set().union(*(common.ceal_groups(two_more, 2, 2, 0, 4, np.random.default_rng(s), pseudo="reference")[3]
                         for s in range(20))) <= {2, 3, 4, 5, 6, 7}
    for kw in ({}, {"band": "reference", "pseudo": "reference"}):  # never overlapping, whatever the reading
        g = common.ceal_groups(scores, 2, 2, 4, 6, np.random.default_rng(1), **kw)
        every = np.concatenate(g)
        assert len(set(every)) == len(every) and set(every) <= everything


def test_ceal_groups_band_is_a_random_draw_over_the_whole_band():
    """Group 3 is drawn at random (Sec. 4.2: "selected randomly") from every candidate of the band: over seeds
    each candidate turns up, nothing outside it does (neither only the lowest candidates, nor a band one bin
    short). The scores of the hand case above: paper band 2-10 (up to 2.7, the upper edge of bin 20 + 6),
    reference band 10-14 (from 2.6 to 4.7)."""
    scores = np.array([0.0, 0.05, 2.01, 2.03, 2.05, 2.06, 2.08, 2.09, 1.5, 2.55, 2.65, 2.72, 3.0, 4.0, 4.65, 4.75,
                       7.9, 8.0])
    for band, n_band, want in (("paper", 3, set(range(2, 11))), ("reference", 2, set(range(10, 15)))):
        draws = [tuple(sorted(common.ceal_groups(scores, 2, 2, n_band, 0, np.random.default_rng(s), band=band)[2]))
                 for s in range(40)]
        assert all(len(d) == n_band for d in draws) and len(set(draws)) > 1, band   # random, n_band each time
        assert set().union(*draws) == want, band   # each candidate at some seed (a miss: 9 x (2/3)^40 ~ 1e-6)


def test_ceal_groups_with_the_mode_in_bin_0():
    """Fig. 6's usual shape: most of the pool near zero uncertainty, so the mode is the first bin (80 bins of 0.1
    over [0, 8], 30 scores in [0, 0.05]). The pseudo-labels come from bin 0, the paper band is bins 0-6, the
    reference band starts at the lower edge of bin 6."""
    scores = np.r_[np.linspace(0, 0.05, 30), np.linspace(1, 8, 20)]
    edges = np.histogram(scores, 80)[1]
    for s in range(10):
        _, _, band, pseudo = common.ceal_groups(scores, 2, 2, 3, 4, np.random.default_rng(s))
        assert all(scores[pseudo] <= edges[1]) and all(scores[band] <= edges[7])
        band = common.ceal_groups(scores, 2, 2, 3, 4, np.random.default_rng(s), band="reference")[2]
        assert all((edges[6] <= scores[band]) & (scores[band] < edges[47]))


def test_ceal_groups_small_pool_serves_the_oracle_first():
    low, high, band, pseudo = common.ceal_groups(np.arange(6.0), 2, 2, 1, 10, np.random.default_rng(0))
    # 80 bins over 0..5: every bin holds at most one score, the mode is bin 0 and the band (up to bin 7,
    # scores <= 0.44) holds only score 0, already in group 1: the band is filled with the next-lowest score
    assert sorted(low) == [0, 1] and sorted(high) == [4, 5] and list(band) == [2] and list(pseudo) == [3]
    assert set(np.concatenate([low, high, band, pseudo])) == set(range(6))
    # a pool smaller than the two oracle groups: the highest group takes none of the lowest
    low, high, band, pseudo = common.ceal_groups(np.arange(3.0), 2, 2, 1, 1, np.random.default_rng(0))
    assert low.tolist() == [0, 1] and high.tolist() == [2] and len(band) == len(pseudo) == 0


def test_score_pool_runs_the_mc_passes_asked_for(monkeypatch):
    """T of Sec. 4.1 is --mc-passes (20 by default: the reference code's nb_step_predictions)."""
    seen = []
    monkeypatch.setattr(common, "mc_variance", lambda model, x, pool, T, *a: seen.append(T) or (
        np.zeros(len(pool)), torch.zeros((len(pool), 4, 4), dtype=torch.uint8)))
    for flags, T in (([], 20), (["--mc-passes", "7"], 7)):
        args = ceal_mcdropout.parse_args(["--data", "isic2017", "--data-dir", ".", *flags])
        ceal_mcdropout.score_pool(None, torch.zeros(3, 3, 4, 4), None, np.arange(3), args, torch.device("cpu"))
        assert seen[-1] == T


def test_score_pool_scores_and_pseudo_labels_come_from_the_model_not_the_masks():
    """Sec. 4.1 and 4.3: the score (the MC variance summed per image) and the pseudo-label masks (the MC mean
    thresholded) are the model's, whatever the hidden masks hold; only Fig. 5's Dice reads them."""
    torch.manual_seed(0)
    model = UNet(3, 1, 4, dropout=0.5, dropout_at="every")  # CEAL's placement
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    pool, cpu = np.array([1, 3, 4, 5]), torch.device("cpu")
    args = ceal_mcdropout.parse_args(["--mc-passes", "3", "--batch-size", "3"])
    torch.manual_seed(1)
    want_scores, want_masks = common.mc_variance(model, x, pool, 3, 3, cpu)
    for y in (torch.randint(0, 2, (6, 16, 16), dtype=torch.uint8), None):
        y_pool = None if y is None else y[torch.as_tensor(pool)]
        if y is not None:  # masks unlike the model's prediction: a score or a mask read from them would differ
            assert not torch.equal(y_pool, want_masks)
        torch.manual_seed(1)
        scores, masks, dice = ceal_mcdropout.score_pool(model, x, y, pool, args, cpu)
        assert np.array_equal(scores, want_scores) and torch.equal(masks, want_masks)
        if y is None:
            assert np.isnan(dice).all() and len(dice) == len(pool)
        else:  # Fig. 5: the Dice of the pseudo-label against the hidden mask, per pool image
            assert np.allclose(dice, common.dice_iou(want_masks > 0, y_pool > 0)[0].numpy())


@pytest.mark.parametrize("query, split", [(35, (10, 10, 15)), (10, (3, 3, 4)), (7, (2, 2, 3))])
def test_ceal_query_splits_the_query_two_sevenths_each_way(monkeypatch, query, split):
    """Sec. 4.2's 35 queries, 10 lowest / 10 highest / 15 band: groups 1 and 2 take 2/7 of --query each, rounded
    to the nearest (10 -> 3 / 3 / 4, not 2 / 2 / 6), group 3 the rest."""
    seen = []
    monkeypatch.setattr(ceal_mcdropout, "score_pool", lambda model, x, y, pool, args, device: (
        np.zeros(len(pool)), torch.zeros((len(pool), 4, 4), dtype=torch.uint8), np.full(len(pool), np.nan)))
    monkeypatch.setattr(common, "ceal_groups", lambda scores, *a, **k: seen.append(a[:3]) or [np.zeros(0, int)] * 4)
    monkeypatch.setattr(ceal_mcdropout, "figures", lambda *a: None)
    args = ceal_mcdropout.parse_args(["--data", "isic2017", "--data-dir", ".", "--query", str(query)])
    ceal_mcdropout.ceal_query(None, 1, None, torch.zeros(50, 3, 4, 4), None, np.arange(50), args, None,
                              torch.device("cpu"))
    assert seen == [split]


def read(run, name):
    return list(csv.DictReader(open(os.path.join(run, name))))


def main(*args):
    """The script in this process (no second import of torch) where its command line is not under test."""
    return ceal_mcdropout.main(["--device", "cpu", *map(str, args)])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One finished TINY run, shared by the tests that only read it."""
    return run_dir_from(run_script("ceal_mcdropout.py", *TINY, "--out", tmp_path_factory.mktemp("ceal")))


def test_end_to_end_resume_and_seed(full_run, tmp_path):
    full = full_run
    rows = read(full, "rounds.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert [int(r["labeled"]) for r in rows] == [10, 17, 24] and [int(r["pseudo"]) for r in rows] == [0, 2, 4]
    q = read(full, "queried.csv")
    assert {r["how"] for r in q} == {"initial", "oracle-lowest", "oracle-highest", "oracle-band", "pseudo"}
    assert len({r["sample_id"] for r in q}) == len(q) == 10 + 7 * 2 + 2 + 2   # nothing queried twice
    train_ids = set(json.load(open(os.path.join(full, "splits.json")))["train"])
    assert {r["sample_id"] for r in q} <= train_ids
    for f in ("summary.json", "learning_curve.png", "panel.png", "figures/uncertainty_hist_round_1.png",
              "figures/uncertainty_hist_round_2.png", "figures/uncertainty_vs_dice_round_2.png", "picks/round_2.png",
              "checkpoint.pt", "config.json", "epochs.csv", "pool_scores.csv"):
        assert os.path.isfile(os.path.join(full, f)), f
    assert json.load(open(os.path.join(full, "summary.json")))["final_dice"] == pytest.approx(float(rows[-1]["dice_mean"]), abs=1e-5)
    epochs = read(full, "epochs.csv")  # Figs. 7-10 per epoch; a round's val_dice is its last epoch's, not re-run
    assert [r["val_dice"] for r in rows] == [[e["val_dice"] for e in epochs if e["round"] == r["round"]][-1] for r in rows]
    assert len({r["val_dice"] for r in rows}) > 1

    # interrupted after round 1 (as if killed), then --resume: the same queries and the same results
    out = run_script("ceal_mcdropout.py", *TINY, "--out", tmp_path / "b", check=False,
                     env_extra={"ALSEG_STOP_AFTER_ROUND": "1"})
    assert out.returncode == 3
    part = os.path.join(tmp_path / "b", os.listdir(tmp_path / "b")[0])
    assert [r["round"] for r in read(part, "rounds.csv")] == ["0", "1"]
    resumed = run_dir_from(run_script("ceal_mcdropout.py", "--resume", part))
    assert resumed == part
    assert read(resumed, "queried.csv") == q
    assert [r["dice_mean"] for r in read(resumed, "rounds.csv")] == [r["dice_mean"] for r in rows]
    assert read(resumed, "pool_scores.csv") == read(full, "pool_scores.csv")
    for name in ("rounds.csv", "queried.csv", "epochs.csv", "pool_scores.csv"):  # rewritten on resume: one line end
        raw = open(os.path.join(resumed, name), "rb").read()
        assert b"\r" not in raw and raw.endswith(b"\n"), name
    interface.assert_interface("ceal_mcdropout.py", resumed, help=False)

    # another seed: other queries (in this process: the command line is under test above)
    other = main(*TINY, "--seed", 1, "--rounds", 1, "--out", tmp_path / "c")
    assert read(other, "queried.csv") != q[:len(read(other, "queried.csv"))]


def test_interface_check(full_run):
    interface.assert_interface("ceal_mcdropout.py", full_run)


@pytest.mark.parametrize("strategy,labeled", [("random", [10, 17]), ("full", [40])])
def test_baselines(tmp_path, strategy, labeled):
    run = main(*TINY, "--rounds", 1, "--strategy", strategy, "--out", tmp_path)
    rows = read(run, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == labeled and all(r["pseudo"] == "0" for r in rows)
    hows = {(r["round"], r["how"]) for r in read(run, "queried.csv")}
    assert hows == ({("0", "full")} if strategy == "full" else {("0", "initial"), ("1", "oracle-random")})
    interface.assert_interface("ceal_mcdropout.py", run, help=False)


def test_real_lgg_layout_as_downloaded(tmp_path):
    if not os.path.isdir(os.path.join(REAL, "kaggle_3m")):
        pytest.skip("real samples absent")
    run = run_dir_from(run_script("ceal_mcdropout.py", "--data", "lgg", "--data-dir", os.path.join(REAL, "kaggle_3m"),
                                  "--split", 2, 0, 2, "--initial", 1, "--query", 1, "--rounds", 1, "--image-size", 32,
                                  "--width", 4, "--epochs-initial", 1, "--epochs", 1, "--mc-passes", 2, "--pseudo-step", 0,  # a pool of 2
                                  "--out", tmp_path))
    rows = read(run, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == [1, 2]
    splits = json.load(open(os.path.join(run, "splits.json")))
    patient = lambda i: "_".join(i.split("_")[:3])
    assert not {patient(i) for i in splits["train"]} & {patient(i) for i in splits["test"]}


def test_bad_input_messages(tmp_path):
    def fails(*args):
        out = run_script("ceal_mcdropout.py", *args, "--out", tmp_path, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        return out.stderr
    assert "--data isic2017 needs --data-dir" in fails("--data", "isic2017")  # the command line: exit 2, no traceback

    def fails_here(message, *args):  # the others in this process: the same UserError that exits 2
        with pytest.raises(common.UserError, match=re.escape(message)):
            main(*args, "--out", tmp_path)
    fails_here("labelling budget 1100", *TINY, "--initial", 1000, "--query", 50)  # the oracle's budget: an error
    # --strategy full takes the same flags: its optimiser steps are those of the run they describe
    fails_here("labelling budget 1100", *TINY, "--initial", 1000, "--query", 50, "--strategy", "full")
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    fails_here("wrong: expected the official layout", "--data", "isic2017", "--data-dir", tmp_path / "wrong")
    fails_here("nowhere: folder not found", "--data", "lgg", "--data-dir", tmp_path / "nowhere")


def test_pseudo_labels_that_do_not_fit_are_counted_and_said(tmp_path, monkeypatch, capsys):
    """The pseudo-labels count in the budget: per-iteration needs 2 x (1 + 2 + 3) = 12 of the pool of 40 beyond
    10 + 7 x 3 oracle labels, 3 too many: the run says so and goes on (the oracle is served first), as Table 2's
    LGG protocol needs (329 + 35 x 10 + 20 x 10 = 879 of 878 slices)."""
    monkeypatch.setenv("ALSEG_STOP_AFTER_ROUND", "0")
    with pytest.raises(SystemExit):
        main(*TINY, "--rounds", 3, "--pseudo-mode", "per-iteration", "--out", tmp_path)
    assert "12 pseudo-labels (per-iteration) exceed the training pool of 40 by 3" in capsys.readouterr().out


# ------------------------------------------------------------------ main() with a known score, picks audited
KNOWN = ["--split", 60, 10, 10, "--image-size", 32, "--width", 4, "--initial", 10, "--query", 7, "--rounds", 2,
         "--epochs-initial", 1, "--epochs", 1, "--batch-size", 16, "--pseudo-step", 3, "--device", "cpu"]


def known_score(n):
    """A score per data index from a fixed permutation, shaped like Fig. 6: a few near 0 (missed lesions), a pile
    at 2.0 (the confident mode), a spread from 2.3 to 2.9 (where the reference band lies) and high ones 5-7."""
    u = np.random.default_rng(123).permutation(n) / n
    return np.select([u < 0.08, u < 0.5, u < 0.8], [0.01 + u, 2.0 + 0.002 * u, 2.3 + 2 * (u - 0.5)], 5 + 10 * (u - 0.8))


def run_known(tmp_path, monkeypatch, *flags):
    """main() in-process with score_pool replaced by known_score and pseudo-masks that are NOT the ground truth
    (the inverted mask), recording the data and every training call's (indices, targets)."""
    seen = {}
    load, train = common.load_data, common.train_epochs

    def load_data(*a, **k):
        seen["data"] = load(*a, **k)
        seen["score"] = known_score(len(seen["data"]))
        return seen["data"]

    def score_pool(model, x, y, pool, args, device):
        pool = np.asarray(pool)
        return seen["score"][pool].copy(), (1 - y[torch.as_tensor(pool)]).to(torch.uint8), np.zeros(len(pool))

    def record_train(model, opt, x, target, idx, *a, **k):
        seen.setdefault("train", []).append((np.asarray(idx).copy(), target[torch.as_tensor(np.asarray(idx))].clone()))
        return train(model, opt, x, target, idx, *a, **k)

    monkeypatch.setattr(common, "load_data", load_data)
    monkeypatch.setattr(common, "train_epochs", record_train)
    monkeypatch.setattr(ceal_mcdropout, "score_pool", score_pool)
    run = ceal_mcdropout.main([*map(str, KNOWN), "--out", str(tmp_path), *flags])
    return run, seen


@pytest.mark.parametrize("mode,band,pick", [("total", "paper", "nearest"), ("redraw", "reference", "reference"),
                                            ("per-iteration", "paper", "nearest")])
def test_picks_follow_the_rule_on_a_known_score(tmp_path, monkeypatch, mode, band, pick):
    run, seen = run_known(tmp_path, monkeypatch, "--pseudo-mode", mode, "--band", band, "--pseudo-pick", pick)
    data, S = seen["data"], seen["score"]
    index = {sid: i for i, sid in enumerate(data.ids)}
    y = torch.as_tensor(data.y)
    q, ps = read(run, "queried.csv"), read(run, "pool_scores.csv")
    got = lambda rnd, how: {index[r["sample_id"]] for r in q if int(r["round"]) == rnd and r["how"] == how}
    train = {index[i] for i in json.load(open(os.path.join(run, "splits.json")))["train"]}
    labelled, pseudo, pool = got(0, "initial"), set(), train - got(0, "initial")
    assert len(labelled) == 10 and len(pool) == 50
    order = [index[i] for i in json.load(open(os.path.join(run, "splits.json")))["train"]]
    assert labelled == set(np.random.default_rng([0, 1]).choice(order, 10, replace=False).tolist())  # seeded, random
    for rnd in (1, 2):
        rows = [r for r in ps if int(r["round"]) == rnd]
        assert {index[r["sample_id"]] for r in rows} == pool                       # the whole pool, scored
        assert all(float(r["uncertainty"]) == pytest.approx(S[index[r["sample_id"]]], rel=1e-5) for r in rows)
        P = np.array(sorted(pool))
        s = S[P]
        order = P[np.argsort(s)]
        low, high, bnd, pse = (got(rnd, h) for h in ("oracle-lowest", "oracle-highest", "oracle-band", "pseudo"))
        assert low == set(order[:2].tolist()) and high == set(order[-2:].tolist())  # 7 -> 2 / 2 / 3 (Sec. 4.2)
        counts, edges = np.histogram(s, 80)
        mode_ = int(np.argmax(counts))
        if band == "paper":
            inside = {int(i) for i in P[s <= edges[mode_ + 7]]}
        else:
            inside = {int(i) for i in P[(s >= edges[mode_ + 6]) & (s < edges[47])]}
        assert len(inside - low - high) >= 3 and len(bnd) == 3 and bnd <= inside - low - high  # a real draw
        k4 = 3 if mode == "total" else 3 * rnd
        rest = np.array(sorted(pool - low - high - bnd))
        if pick == "nearest":
            centre = (edges[mode_] + edges[mode_ + 1]) / 2
            assert pse == set(rest[np.argsort(np.abs(S[rest] - centre), kind="stable")[:k4]].tolist())
        else:
            in_mode = {int(i) for i in rest if edges[mode_] <= S[i] < edges[mode_ + 1]}
            assert len(in_mode) > k4 and len(pse) == k4 and pse <= in_mode
        picked = {index[r["sample_id"]]: r["picked"] for r in rows if r["picked"]}
        assert picked == {**{i: "oracle-lowest" for i in low}, **{i: "oracle-highest" for i in high},
                          **{i: "oracle-band" for i in bnd}, **{i: "pseudo" for i in pse}}
        # the sets: oracle picks leave the pool; pseudo-labels leave it too, except when re-drawn each round
        labelled |= low | high | bnd
        pseudo = pse if mode == "redraw" else pseudo | pse
        pool = pool - low - high - bnd - (set() if mode == "redraw" else pse)
        # what was trained on: ground truth for the oracle's samples, the model's mask (here the inverted
        # ground truth) for the pseudo-labels, never the UNLABELLED sentinel
        idx, target = seen["train"][rnd]
        assert set(idx.tolist()) == labelled | pseudo and len(idx) == len(labelled) + len(pseudo)
        for i, t in zip(idx.tolist(), target):
            assert torch.equal(t, y[i] if i in labelled else 1 - y[i]), (rnd, i, i in pseudo)
        assert (target != 255).all()
        assert os.path.isfile(os.path.join(run, "picks", f"round_{rnd}.png"))
        for f in ("uncertainty_hist", "uncertainty_vs_dice"):
            assert os.path.isfile(os.path.join(run, "figures", f"{f}_round_{rnd}.png"))
    rows = read(run, "rounds.csv")
    assert [int(r["pseudo"]) for r in rows] == {"total": [0, 3, 6], "redraw": [0, 3, 6], "per-iteration": [0, 3, 9]}[mode]
    assert [int(r["pool_left"]) for r in rows][-1] == len(pool)


def test_random_strategy_writes_pool_scores_and_picks(tmp_path, monkeypatch):
    run, seen = run_known(tmp_path, monkeypatch, "--strategy", "random", "--rounds", "1")
    ps, q = read(run, "pool_scores.csv"), read(run, "queried.csv")
    assert len(ps) == 50 and all(r["uncertainty"] == "" for r in ps)
    assert {r["sample_id"] for r in ps if r["picked"] == "oracle-random"} == \
        {r["sample_id"] for r in q if r["how"] == "oracle-random"} and len(q) == 17
    assert os.path.isfile(os.path.join(run, "picks", "round_1.png"))


def test_pseudo_step_scales_with_the_pool_on_other_data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    common.write_folder(common.make_synthetic(200, 32, 3, seed=0), str(root))
    run = ceal_mcdropout.main(["--data", "folder", "--data-dir", str(root), "--image-size", "32", "--width", "4",
                               "--rounds", "1", "--epochs-initial", "1", "--epochs", "1", "--mc-passes", "2",
                               "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "runs")])
    args = json.load(open(os.path.join(run, "config.json")))["args"]
    n = len(json.load(open(os.path.join(run, "splits.json")))["train"])
    assert n == 128 and (args["initial"], args["query"], args["pseudo_step"]) == (48, 3, 2)  # 600, 35, 20 of 1600
    assert [int(r["pseudo"]) for r in read(run, "rounds.csv")] == [0, 2]


def test_plot_hist_ticks_line_up_with_the_bars(tmp_path):
    """The marks under the bars use plot()'s geometry (its right margin holds the legend): a mark at the
    highest score sits under the last bar, not in the legend."""
    values = np.concatenate([np.linspace(0, 1, 50), [3.0]])
    common.plot_hist(tmp_path / "h.png", values, 80, marks={"top": [3.0], "bottom": [0.0]})
    a = np.asarray(Image.open(tmp_path / "h.png").convert("RGB")).astype(int)
    H, B = a.shape[0], 48
    bar = np.flatnonzero((np.abs(a - [123, 175, 211]) < 4).all(2).any(0))  # the bars' columns (blue over white)
    runs = np.split(bar, np.flatnonzero(np.diff(bar) > 2) + 1)  # (the frame line may cut a bar)
    cols = lambda rgb, row: np.flatnonzero((np.abs(a[row] - rgb) < 3).all(1))
    top = cols(np.array(common.COLOURS[1]), H - B - 3)      # the ticks' row, under the bars
    bottom = cols(np.array(common.COLOURS[2]), H - B - 3)
    assert len(top) and runs[-1].min() <= top.mean() <= runs[-1].max(), (top, runs[-1])  # under the lone bar at 3.0
    assert len(bottom) and runs[0].min() <= bottom.mean() <= runs[0].min() + 8, (bottom, runs[0])  # the first bar
