"""polyp_weighted_cluster.py: Eq. 1-5 and the query rules on hand-computed cases, the script end to end on
tiny synthetic data (every strategy, --resume, --tables) and on the real CVC-ClinicDB / Kvasir-SEG samples."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import interface
from conftest import REAL, ROOT, THREADS, run_dir_from, run_script

import common
import polyp_weighted_cluster as pwc

TINY = ["--split", 40, 0, 10, "--image-size", 32, "--width", 4, "--rounds", 2, "--epochs", 1, "--epochs-initial", 1,
        "--batch-size", 8, "--initial", 6, "--query", 4, "--asa-members", 2, "--kmeans-init", 2]


def rows(run, name="rounds.csv"):
    return list(csv.DictReader(open(os.path.join(run, name))))


# ---- Eq. 1-3 and Eq. 5 on hand-made feature maps ----------------------------------------------------------
def test_class_features_uncertainty_and_loss_by_hand():
    # Features (1 image, 2 channels, 2x2); the 4x4 prediction averages to y1 = [[1, .5], [0, 0]] at 2x2.
    feats = torch.tensor([[[[2., 2.], [0., 0.]], [[0., 1.], [1., 1.]]]])
    probs = torch.zeros(1, 4, 4)
    probs[0, :2, :2] = 1
    probs[0, :2, 2] = 1  # half of the top-right 2x2 block
    f1, f0 = pwc.class_features(probs, feats)
    # F1 = mean(y1 * f) = [(2 + 2 * .5) / 4, (1 * .5) / 4]; F0 = mean((1 - y1) * f) = [(2 * .5) / 4, (.5 + 1 + 1) / 4]
    assert torch.allclose(f1, torch.tensor([[3 / 4, 1 / 8]]))
    assert torch.allclose(f0, torch.tensor([[1 / 4, 5 / 8]]))
    i = pwc.uncertainty(f1, f0)
    assert i.item() == pytest.approx(17 / math.sqrt(37 * 29), abs=1e-6)  # (3/16 + 5/64) / (sqrt(37)/8 sqrt(29)/8)
    # A prediction that separates two orthogonal feature regions: I = 0; a flat 0.5 prediction: F1 = F0, I = 1.
    feats2 = torch.tensor([[[[1., 0.], [0., 0.]], [[0., 0.], [0., 1.]]]])
    sep = torch.zeros(1, 4, 4)
    sep[0, :2, :2] = 1
    assert pwc.uncertainty(*pwc.class_features(sep, feats2)).item() == pytest.approx(0.0, abs=1e-7)
    assert pwc.uncertainty(*pwc.class_features(torch.full((1, 4, 4), .5), feats2)).item() == pytest.approx(1.0)
    # Eq. 5 over a batch: mean of max(0, I - delta); the separated image is under the margin and adds 0.
    f1b, f0b = pwc.class_features(torch.cat([probs, sep]), torch.cat([feats, feats2]))
    assert pwc.fdl_loss(f1b, f0b, 0.2).item() == pytest.approx((17 / math.sqrt(1073) - 0.2) / 2, abs=1e-6)


def test_fdl_gradient_pushes_class_features_apart():
    feats = torch.rand(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    probs = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1))
    before = pwc.uncertainty(*pwc.class_features(probs, feats)).detach()
    pwc.fdl_loss(*pwc.class_features(probs, feats), 0.2).backward()
    after = pwc.uncertainty(*pwc.class_features(probs, feats - 0.5 * feats.grad)).detach()
    assert (before > 0.2).all() and (after < before).all()
    feats.grad = None
    pwc.fdl_loss(*pwc.class_features(probs, feats), 1.0).backward()  # every I < 1 = delta: no gradient
    assert feats.grad.abs().max().item() == 0


@pytest.mark.parametrize("delta", ["1", "1.5", "-1.01"])
def test_a_margin_no_cosine_can_cross_is_refused(delta):
    # Eq. 5 hinges cos in [-1, 1] at delta: from 1 up L_fdl is 0 on every image, below -1 only a constant is added
    with pytest.raises(common.UserError, match=f"--delta {float(delta)}: expected a margin in \\[-1, 1\\)"):
        pwc.parse_args(["--delta", delta])
    assert pwc.parse_args(["--delta", "-1"]).delta == -1 and pwc.parse_args(["--delta", "0.99"]).delta == 0.99


def test_class_mean_iou_by_hand():
    pred = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
    gt = torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]]])
    # image 1: polyp IoU 1/2, background IoU 2/3; image 2: both empty -> polyp IoU 1, background IoU 1
    assert pwc.class_mean_iou(pred, gt).tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 1.0])


# ---- Eq. 4: uncertainty-weighted K-means and the query nearest each centroid -------------------------------
def test_weighted_kmeans_pulls_centroids_to_heavy_points():
    x = np.array([[0.], [1.], [2.], [10.], [11.], [12.]])
    w = np.array([1., 1., 1., 1., 1., 10.])
    centres, labels, obj = pwc.weighted_kmeans(x, w, 2, seed=0)
    order = np.argsort(centres[:, 0])
    # centres are the I-weighted means: 1 and (10 + 11 + 10 * 12) / 12 = 11.75
    assert centres[order, 0] == pytest.approx([1.0, 11.75])
    # Eq. 4 objective sum_k sum_x I(x) ||F(x) - mu_k||^2 by hand: (1 + 0 + 1) + (1.75^2 + .75^2 + 10 * .25^2) = 6.25
    assert obj == pytest.approx(6.25)
    assert sorted(pwc.nearest_to_centroids(x, centres, labels).tolist()) == [1, 5]  # weighted: 1 and 12
    centres_u, labels_u, _ = pwc.weighted_kmeans(x, np.ones(6), 2, seed=0)
    assert sorted(pwc.nearest_to_centroids(x, centres_u, labels_u).tolist()) == [1, 4]  # unweighted: 1 and 11
    # one cluster: the weighted mean of 0, 1, 2, 3 with weights 1, 1, 1, 100 is 303 / 103 -> sample 3, not 1
    x1 = np.array([[0.], [1.], [2.], [3.]])
    c, l, _ = pwc.weighted_kmeans(x1, [1, 1, 1, 100], 1, seed=0)
    assert c[0, 0] == pytest.approx(303 / 103) and pwc.nearest_to_centroids(x1, c, l).tolist() == [3]
    c, l, _ = pwc.weighted_kmeans(x1, [1, 1, 1, 1], 1, seed=0)
    assert pwc.nearest_to_centroids(x1, c, l).tolist() == [1]


def test_printed_eq4_size_factor_is_not_kmeans():
    """Documents the reading in weighted_kmeans: the printed 1/|S_k| factor would change the partition."""
    x = np.array([[0.]] * 10 + [[3.], [6.]])
    printed = lambda parts: sum(((x[p] - x[p].mean()) ** 2).sum() / len(p) for p in parts)
    kmeans = lambda parts: sum(((x[p] - x[p].mean()) ** 2).sum() for p in parts)
    a, b = [list(range(10)), [10, 11]], [list(range(11)), [11]]
    assert kmeans(a) < kmeans(b) and printed(b) < printed(a)  # 4.5 < 8.18 but 0.74 < 2.25
    _, labels, _ = pwc.weighted_kmeans(x, np.ones(12), 2, seed=0)
    assert labels[10] == labels[11] != labels[0]  # scikit-learn finds K-means' partition a


def test_nearest_to_centroids_never_queries_twice():
    x = np.array([[0.], [10.], [20.]])
    # both centroids nearest sample 0, the second cluster has no members: it takes the next nearest unused
    assert pwc.nearest_to_centroids(x, np.array([[1.], [2.]]), np.array([0, 0, 0])).tolist() == [0, 1]
    # a member is preferred to a closer non-member
    assert pwc.nearest_to_centroids(x, np.array([[0.], [9.]]), np.array([0, 0, 1])).tolist() == [0, 2]


# ---- baselines -------------------------------------------------------------------------------------------
def test_coreset_kcenter_greedy_by_hand():
    lab = torch.tensor([[0., 0.]])
    pool = torch.tensor([[1., 0.], [5., 0.], [10., 0.], [9., 0.]])
    # as select() does: labelled first, pool positions = chosen - len(labelled)
    chosen = pwc.kcenter_greedy(torch.cat([lab, pool]), np.r_[True, [False] * 4], 3) - 1
    # farthest from {0}: 10; then min-distances 1, 5, -, 1 -> 5; then 1, -, -, 1 -> first of the tie (1)
    assert chosen.tolist() == [2, 1, 0]


def test_asa_representative_by_hand():
    pool = np.array([[1., 0.], [1., 0.], [0., 1.]])
    lab = np.array([[1., 0.]])
    cand = np.array([[1., 0.], [0., 1.]])
    # step 1: gain = mean cos to pool - mean cos to labelled = [2/3 - 1, 1/3 - 0] -> candidate 1
    # step 2: labelled = {[1,0], [0,1]}: candidate 0 gains 2/3 - 1/2
    assert pwc.asa_representative(cand, pool, lab, 2).tolist() == [1, 0]
    # one pick, labelled like the pool's majority: the candidate unlike it wins
    assert pwc.asa_representative(cand, pool, np.array([[0., 1.]]), 1).tolist() == [0]
    # greedy: each pick joins the labelled set before the next. Gains (mean cos to pool - to labelled) of
    # [1, 0], [.98, .2], [0, 1]: -0.08, -0.126, -0.24 -> 0; labelled {[.6, .8], [1, 0]}: -, -0.242, +0.16 -> 2
    # (a gain left at the first step's would pick 1)
    pool = np.array([[1., 0.], [1., 0.], [0., 1.], [0., 1.], [.6, .8]])
    cand = np.array([[1., 0.], [.98, .2], [0., 1.]])
    assert pwc.asa_representative(cand, pool, np.array([[.6, .8]]), 2).tolist() == [0, 2]


def test_asa_uncertainty_is_the_variance_of_members_on_bootstraps(monkeypatch):
    """ASA-style (assumed): each member is a copy of the model trained on a bootstrap resample of the labelled
    set (as many draws as labelled images, with replacement), and the score is the pixel variance of the
    members' own predictions. common.train replaced: member m's output is the model's logit + m."""
    calls = []

    def train(member, opt, x, y, idx, *a, **kw):
        calls.append(np.asarray(idx).copy())
        with torch.no_grad():
            member.head.bias += len(calls)
        return [0.0]

    monkeypatch.setattr(common, "train", train)
    torch.manual_seed(0)
    model, x = pwc.UNet(3, 1, 4), torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labeled, pool, cpu = np.arange(6), np.arange(6, 10), torch.device("cpu")
    args = types.SimpleNamespace(asa_members=4, lr=1e-3, epochs=1, batch_size=4, amp=False)
    var = pwc.asa_uncertainty(model, x, x[:, 0], labeled, pool, args, cpu, np.random.default_rng(0))
    assert len(calls) == 4 and all(len(c) == 6 and set(c) <= set(labeled) for c in calls)
    assert any(len(set(c)) < 6 for c in calls)  # drawn with replacement
    logit = common.predict(model, x, pool, 4, cpu).logit()
    want = torch.stack([torch.sigmoid(logit + m) for m in (1, 2, 3, 4)]).var(0, unbiased=False).flatten(1).mean(1)
    assert var.tolist() == pytest.approx(want.tolist(), rel=1e-4) and (var > 0).all()


def test_split_without_validation():
    """'Seeded random 550 / 62': --split TRAIN 0 TEST works with common.make_splits."""
    data = common.make_synthetic(20, 16, 3, 0)
    train, val, test = common.make_splits(data, [15, 0, 5], 0)
    assert len(train) == 15 and len(val) == 0 and len(test) == 5 and not set(train) & set(test)


def test_training_hook_detaches_the_mask_unless_the_flag_says():
    """fdl_training's L_fdl hook (what main() trains with) passes --fdl-grad-through-mask on: by default its
    gradient reaches the encoder only, with the flag the decoder too (delta -1: the hinge is always on)."""
    torch.manual_seed(0)
    model, x = pwc.UNet(3, 1, 4), torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    decoder, cpu = [p for m in (model.ups, model.dec, model.head) for p in m.parameters()], torch.device("cpu")
    for flags, reaches_decoder in (([], False), (["--fdl-grad-through-mask"], True)):
        args = pwc.parse_args(["--strategy", "ours", "--delta", "-1", *flags])
        extra_loss = pwc.fdl_training(1, args, x, np.arange(5), torch.Generator(), cpu)[0]
        model.zero_grad(set_to_none=True)
        extra_loss(model).backward()
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.enc.parameters())
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in decoder) == reaches_decoder, flags


def test_discrepancy_loss_detaches_the_mask_by_default():
    """L_fdl moves the encoder features, not the prediction that masks them, unless --fdl-grad-through-mask."""
    torch.manual_seed(0)
    model = pwc.UNet(3, 1, 4)
    xu = torch.rand(2, 3, 32, 32) * 2 - 1
    decoder = [p for m in (model.ups, model.dec, model.head) for p in m.parameters()]
    for through, reaches_decoder in ((False, False), (True, True)):
        model.zero_grad(set_to_none=True)
        loss = pwc.discrepancy_loss(model, xu, -1.0, through_mask=through)  # delta = -1: the hinge is always on
        loss.backward()
        assert 1 <= loss.item() <= 2  # cos + 1, cos >= 0 on ReLU features
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.enc.parameters())
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in decoder) == reaches_decoder, through


def test_sq_distances_equal_the_broadcast_form():
    """The ||a||^2 - 2ab + ||b||^2 form gives the (N, K, C) broadcast's distances and the same queries."""
    rng = np.random.default_rng(0)
    for n, k, c in ((200, 12, 64), (50, 5, 3)):
        feats, centres = rng.normal(size=(n, c)) * rng.uniform(0.1, 10), rng.normal(size=(k, c))
        old = ((feats[:, None, :] - centres[None]) ** 2).sum(-1)
        assert np.allclose(pwc.sq_distances(feats, centres), old, rtol=1e-9, atol=1e-9)
        labels = np.argmin(old, 1)
        chosen_old = []
        for j in range(k):  # the previous nearest_to_centroids, verbatim apart from the distance array
            members = np.flatnonzero(labels == j)
            order = np.r_[members[np.argsort(old[members, j], kind="stable")], np.argsort(old[:, j], kind="stable")]
            chosen_old.append(next(int(i) for i in order if int(i) not in chosen_old))
        assert pwc.nearest_to_centroids(feats, centres, labels).tolist() == chosen_old


# ---- main() with a known scorer: the picks in queried.csv against each rule --------------------------------
N_FAKE, K_FAKE = 50, 4  # TINY: 40 + 0 + 10 samples, B = 4


def fake_scores(pool, gaussian=False):
    """Known per-sample scores, indexed by data index, laid out over the first round's pool. Features: K
    well-separated groups (1000 apart on axis 0), members spread along axis 1 by rank; within a group I(x) falls
    fivefold per rank, so the I-weighted centroid lies within 0.25 of the group's most uncertain member while the
    unweighted one sits in the middle of the group. Samples outside the pool (labelled, test) get ranks after it.
    gaussian: 8-d standard normal features instead (no near-ties in float32 distances, for Core-set)."""
    rng = np.random.default_rng(7)
    order = np.r_[rng.permutation(np.asarray(pool)), rng.permutation(np.setdiff1d(np.arange(N_FAKE), pool))]
    group, rank = np.zeros(N_FAKE, int), np.zeros(N_FAKE, int)
    group[order], rank[order] = np.arange(N_FAKE) % K_FAKE, np.arange(N_FAKE) // K_FAKE
    unc = 5.0 ** -rank * (1 + 0.05 * group)  # distinct: top-k without ties; above the 1e-6 clip in the pool
    feat = np.c_[1000.0 * group, rank + rng.uniform(0, 0.01, N_FAKE)]
    ent = rng.permutation(N_FAKE) / N_FAKE
    if gaussian:
        feat = rng.normal(size=(N_FAKE, 8))
    return group, feat, unc, ent


@pytest.fixture
def known_scorer(monkeypatch):
    """main() in-process, training skipped, pwc.score replaced by fake_scores(); returns run(strategy, *flags)
    -> (run dir, [(pool before the round, picks of the round) for rounds 1, 2], the captured L_fdl hooks,
    the fake scores (group, feat, unc, ent))."""
    hooks, fake, nonlocal_gaussian = [], [], [False]

    def score(model, x, idx, batch_size, device, amp=False):
        idx = np.asarray(idx)
        if not fake:  # the first call of a run scores round 1's pool
            fake.extend(fake_scores(idx, nonlocal_gaussian[0]))
        _, feat, unc, ent = fake
        return torch.tensor(feat[idx]).float(), torch.tensor(unc[idx]), torch.tensor(ent[idx])

    def train(model, opt, x, y, idx, epochs, batch_size, *, extra_loss=None, **kw):
        if extra_loss is not None:
            hooks.append((model, extra_loss))
        return [(e, 0.0, 0.0) for e in range(epochs)]

    monkeypatch.setattr(pwc, "score", score)
    monkeypatch.setattr(common, "train_epochs", train)
    out = os.environ["ALSEG_CACHE"]

    def run(strategy, *flags, gaussian=False):
        fake.clear()
        nonlocal_gaussian[0] = gaussian
        d = pwc.main(["--device", "cpu", *map(str, TINY), "--kmeans-init", "10", "--strategy", strategy,
                      "--out", out, *map(str, flags)])
        unc = fake[2]
        idx = {sid: i for i, sid in enumerate(f"syn{i:05d}" for i in range(N_FAKE))}
        q = rows(d, "queried.csv")
        pool = set(idx[s] for s in json.load(open(os.path.join(d, "splits.json")))["train"])
        pool -= {idx[r["sample_id"]] for r in q if r["how"] == "initial"}
        rounds = []
        for rnd in (1, 2):
            picks = {idx[r["sample_id"]] for r in q if r["round"] == str(rnd)}
            scores = [r for r in rows(d, "pool_scores.csv") if r["round"] == str(rnd)]
            # pool_scores.csv: this round's pool, the fake I(x), and the picks
            assert {idx[r["sample_id"]] for r in scores} == pool
            assert all(float(r["uncertainty"]) == pytest.approx(unc[idx[r["sample_id"]]], rel=1e-5) for r in scores)
            assert {idx[r["sample_id"]] for r in scores if r["picked"]} == picks and len(picks) == K_FAKE
            rounds.append((sorted(pool), picks))
            pool -= picks
        return d, rounds, hooks, tuple(fake)

    return run


def test_ours_queries_the_most_uncertain_member_of_each_group(known_scorer):
    """Eq. 4 with K = B: the I-weighted centroid of each group lies on its most uncertain member, which is
    queried, by ours and by w/o DIS alike; unweighted (w/o UNC) the query is the member nearest the group's plain
    mean. (Inverting the weights, or dropping them, makes the first assertion fail.)"""
    _, rounds, hooks, (group, feat, unc, _) = known_scorer("ours", "--delta", -1)
    for pool, picks in rounds:
        pool = np.array(pool)
        assert picks == {int(pool[group[pool] == g][np.argmax(unc[pool[group[pool] == g]])]) for g in range(K_FAKE)}
    # L_fdl enters Eq. 7 with a positive weight: with delta = -1 the hook returns lambda (cos + 1) in [0.1, 0.2]
    assert hooks, "ours trains with L_fdl after the initial round"
    model, extra_loss = hooks[-1]
    model.train()
    assert 0.1 <= extra_loss(model).item() <= 0.2
    n_hooks = len(hooks)  # (the fixture's list of hooks grows over its runs)
    assert known_scorer("wo-dis")[1] == rounds and len(hooks) == n_hooks  # Table 2: ours' query, no L_fdl
    _, rounds, _, (group, feat, _, _) = known_scorer("wo-unc")
    for pool, picks in rounds:
        pool = np.array(pool)
        want = set()
        for g in range(K_FAKE):
            m = pool[group[pool] == g]
            want.add(int(m[np.argmin(((feat[m] - feat[m].mean(0)) ** 2).sum(1))]))
        assert picks == want


def test_entropy_wo_clu_and_coreset_pick_by_their_rules(known_scorer):
    for strategy, key in (("entropy", 3), ("wo-clu", 2)):  # the B highest scores of the pool (entropy, I(x))
        _, rounds, _, fake = known_scorer(strategy)
        for pool, picks in rounds:
            assert picks == set(np.array(pool)[np.argsort(-fake[key][pool])[:K_FAKE]].tolist()), strategy
    d, rounds, _, (_, feat, _, _) = known_scorer("coreset", gaussian=True)
    labelled = {int(r["sample_id"][3:]) for r in rows(d, "queried.csv") if r["how"] == "initial"}
    for pool, picks in rounds:  # k-center greedy: each pick the pool sample farthest from everything chosen
        chosen = sorted(labelled)
        for _ in range(K_FAKE):
            dist = np.sqrt(((feat[pool][:, None] - feat[chosen][None]) ** 2).sum(-1)).min(1)
            chosen.append(pool[int(np.argmax(dist))])
        assert picks == set(chosen[-K_FAKE:])
        labelled |= picks


def test_asa_picks_among_the_most_variable_candidates(known_scorer, monkeypatch):
    """ASA-style: the asa_candidates x B pool samples of highest ensemble variance are the candidates, and the
    representativeness step (asa_representative, checked by hand above) picks B of them. The variance here is a
    known score unrelated to I(x); candidates taken from the wrong end, or indexed wrongly, fail."""
    variance = np.random.default_rng(3).permutation(N_FAKE) / N_FAKE
    monkeypatch.setattr(pwc, "asa_uncertainty", lambda model, x, y, labeled, pool, *a: torch.tensor(variance[pool]))
    d, rounds, _, (_, feat, _, _) = known_scorer("asa", gaussian=True)
    labelled = sorted(int(r["sample_id"][3:]) for r in rows(d, "queried.csv") if r["how"] == "initial")
    for pool, picks in rounds:
        pool = np.array(pool)
        cand = pool[np.argsort(-variance[pool])[:2 * K_FAKE]]  # --asa-candidates 2 (the default)
        want = cand[pwc.asa_representative(feat[cand], feat[pool], feat[labelled], K_FAKE)]
        assert picks == set(want.tolist())
        labelled += sorted(picks)


def test_test_list_fixes_the_test_set(known_scorer, tmp_path):
    names = tmp_path / "test.txt"
    names.write_text("# PraNet-style list\nsyn00003.png\nsyn00011\n\nimages/syn00040.jpg\n")
    d = known_scorer("random", "--test-list", names)[0]
    splits = json.load(open(os.path.join(d, "splits.json")))
    assert sorted(splits["test"]) == ["syn00003", "syn00011", "syn00040"] and len(splits["train"]) == 40
    assert not set(splits["train"]) & set(splits["test"])
    assert json.load(open(os.path.join(d, "config.json")))["args"]["split"] == [40, 0, 3]
    names.write_text("syn00003\nsyn00999\nnope\n")
    with pytest.raises(common.UserError, match="2 of its 3 names.*syn00999, nope"):
        known_scorer("random", "--test-list", names)
    names.write_text("\ufeffsyn00003\nsyn00011\n", encoding="utf-8")  # a byte-order mark (Windows editors)
    assert sorted(json.load(open(os.path.join(known_scorer("random", "--test-list", names)[0], "splits.json")))["test"]
                  ) == ["syn00003", "syn00011"]
    names.write_text("syn00003\nsyn00011\n", encoding="utf-16")  # Notepad's "Unicode": was a UnicodeDecodeError
    with pytest.raises(common.UserError, match=f"--test-list {names}: cannot read it \\(not UTF-8 text"):
        known_scorer("random", "--test-list", names)


# ---- end to end: every strategy on tiny synthetic data -----------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ours as a user runs it; the seven others through main(argv) in one more process (one import of torch
    instead of seven: the imports, not the runs, dominate at this size)."""
    out = tmp_path_factory.mktemp("runs")
    dirs = {"ours": run_dir_from(run_script("polyp_weighted_cluster.py", *TINY, "--out", out))}
    others = [s for s in pwc.STRATEGIES if s not in ("ours", "full")]  # full: tests/test_full_ceiling.py
    code = ("import sys, polyp_weighted_cluster as p\n"
            "for s in sys.argv[1:]: print(s, p.main(['--device', 'cpu', *%r, '--strategy', s, '--out', %r]))"
            % ([str(a) for a in TINY], str(out)))
    res = subprocess.run([sys.executable, "-c", code, *others], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS=THREADS))
    assert res.returncode == 0, res.stderr[-3000:]
    dirs.update(l.split(" ", 1) for l in res.stdout.splitlines() if l.split(" ", 1)[0] in others)
    assert set(dirs) == set(pwc.STRATEGIES) - {"full"}, res.stdout[-2000:]
    return dirs


def test_every_strategy_end_to_end(runs):
    interface.assert_interface("polyp_weighted_cluster.py", runs.values())  # --help once, every run folder
    for s, run in runs.items():
        r = rows(run)
        assert [int(x["labeled"]) for x in r] == [6, 10, 14]
        assert all(0 <= float(x["miou_mean"]) <= 1 and x["miou_std"] != "" for x in r)
        q = rows(run, "queried.csv")
        ids = [x["sample_id"] for x in q]
        assert len(ids) == 14 and len(set(ids)) == 14, f"{s}: a sample was queried twice"
        train = set(json.load(open(os.path.join(run, "splits.json")))["train"])
        assert set(ids) <= train
        scores = rows(run, "pool_scores.csv")
        picked = [x["sample_id"] for x in scores if x["picked"]]
        assert sorted(picked) == sorted(ids[6:]) and {x["picked"] for x in scores} == {"", f"oracle-{s}"}, s
        assert [x["how"] for x in q[:6]] == ["initial"] * 6 and {x["round"] for x in q[:6]} == {"0"}
        assert all(os.path.isfile(os.path.join(run, "picks", f"round_{k}.png")) for k in (1, 2)), s
        assert json.load(open(os.path.join(run, "summary.json")))["final_dice"] == pytest.approx(float(r[-1]["dice_mean"]))
    # every strategy starts from the same initial model (Table 2: one 30-labelled score for all variants)
    first = {s: rows(run)[0]["dice_mean"] for s, run in runs.items()}
    assert len(set(first.values())) == 1, first
    # L_fdl is trained in the rounds of ours / w/o UNC / w/o CLU only, never in the initial training
    for s, run in runs.items():
        fdl = {int(e["round"]): float(e["fdl"]) for e in rows(run, "epochs.csv")}
        assert fdl[0] == 0
        assert (fdl[1] > 0 and fdl[2] > 0) if s in pwc.FDL_STRATEGIES else (fdl[1] == 0 and fdl[2] == 0), (s, fdl)
    # the clustering strategies draw their figure of the clusters
    assert all(os.path.isfile(os.path.join(runs[s], "clusters.png")) for s in ("ours", "wo-unc", "wo-dis"))


def test_resume_gives_the_uninterrupted_run(runs, tmp_path):
    env = dict(os.environ, ALSEG_STOP_AFTER_ROUND="1", OMP_NUM_THREADS=THREADS)  # as conftest.run_script
    out = subprocess.run([sys.executable, os.path.join(ROOT, "polyp_weighted_cluster.py"), "--device", "cpu",
                          *map(str, TINY), "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 3, out.stderr[-2000:]
    run = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert len(rows(run)) == 2
    resumed = run_dir_from(run_script("polyp_weighted_cluster.py", "--resume", run))
    assert resumed == run
    assert rows(run, "queried.csv") == rows(runs["ours"], "queried.csv")
    for a, b in zip(rows(run), rows(runs["ours"])):
        for c in ("labeled", "dice_mean", "miou_mean", "pool_unc", "queried_unc"):
            assert (a[c] == b[c] == "") or float(a[c]) == pytest.approx(float(b[c]), abs=1e-5), c
    assert len(rows(run)) == 3
    # a finished run resumed (as one killed while it wrote its last files) writes panel.csv again, not twice
    ids = [r["sample_id"] for r in rows(runs["ours"], "panel.csv")]
    assert [r["sample_id"] for r in rows(run, "panel.csv")] == ids and len(ids) == 4
    run_script("polyp_weighted_cluster.py", "--resume", run)
    assert [r["sample_id"] for r in rows(run, "panel.csv")] == ids and len(rows(run)) == 3


def test_tables_from_runs(runs, tmp_path):
    for k in (1, 2):  # two copies of each run: n = 2, std 0
        for s, run in runs.items():
            shutil.copytree(run, tmp_path / f"copy{k}" / os.path.basename(run))
    unfinished = tmp_path / "copy3" / os.path.basename(runs["ours"])  # crashed or still running: left out
    shutil.copytree(runs["ours"], unfinished)
    os.remove(unfinished / "summary.json")
    out = run_script("polyp_weighted_cluster.py", "--tables", tmp_path).stdout
    assert "Table 1 on synthetic" in out and "Table 2 on synthetic" in out
    ours = rows(runs["ours"])[-1]
    line = next(l for l in out.splitlines() if l.startswith("| 14 | ours |"))
    assert f"| 2 | {float(ours['miou_mean']):.4f} ± 0.0000 | {float(ours['dice_mean']):.4f} ± 0.0000 |" in line
    t2 = out.split("Table 2")[1]
    assert "| wo-unc | 2 |" in t2 and "| asa |" not in t2 and "paper:" not in t2
    assert "no finished polyp_weighted_cluster run" in run_script("polyp_weighted_cluster.py", "--tables",
                                                                  tmp_path / "none", check=False).stderr
    other = tmp_path / "copy4" / os.path.basename(runs["ours"])  # another --lam: never pooled with the default's
    shutil.copytree(runs["ours"], other)
    cfg = json.load(open(other / "config.json"))
    cfg["args"]["lam"] = 0.0
    json.dump(cfg, open(other / "config.json", "w"))
    err = run_script("polyp_weighted_cluster.py", "--tables", tmp_path, check=False)
    assert err.returncode == 2 and "Traceback" not in err.stderr and "ran with other --lam" in err.stderr
    assert str(other) in err.stderr and "expected one setting per cell" in err.stderr
    # the same run as another schedule (--query 5, the default --lam; labelled counts that no cell of the others
    # holds, so that summarise alone would let it through): not side by side with them in one row
    with open(other / "rounds.csv", "w") as f:
        lines = open(os.path.join(runs["ours"], "rounds.csv")).read().splitlines()
        col = lines[0].split(",").index("labeled")
        f.write("\n".join([lines[0]] + [",".join(str(int(v) + 1) if i == col else v for i, v in enumerate(l.split(",")))
                                        for l in lines[1:]]) + "\n")
    json.dump(dict(cfg, args=dict(cfg["args"], lam=pwc.parse_args([]).lam, query=5)), open(other / "config.json", "w"))
    err = run_script("polyp_weighted_cluster.py", "--tables", tmp_path, check=False)
    assert err.returncode == 2 and "Traceback" not in err.stderr, err.stderr
    assert "the synthetic runs follow 2 schedules; a table compares the methods under one" in err.stderr
    assert f"--query 5: e.g. {other}" in err.stderr


# ---- the real CVC-ClinicDB and Kvasir-SEG samples --------------------------------------------------------------
@pytest.mark.parametrize("data,folder", [("cvc-clinicdb", "CVC-ClinicDB"), ("kvasir-seg", "Kvasir-SEG")])
def test_real_samples(data, folder):
    if not os.path.isdir(os.path.join(REAL, folder)):
        pytest.skip(f"{REAL}/{folder} absent")
    out = run_script("polyp_weighted_cluster.py", "--data", data, "--data-dir", os.path.join(REAL, folder),
                     "--split", 6, 2, 2, "--image-size", 32, "--width", 4, "--initial", 2, "--query", 2,
                     "--rounds", 1, "--epochs", 1, "--epochs-initial", 1, "--batch-size", 4, "--kmeans-init", 1,
                     "--out", os.path.join(os.environ["ALSEG_CACHE"], "runs"))
    run = run_dir_from(out)
    assert [int(r["labeled"]) for r in rows(run)] == [2, 4]
    names = set(os.listdir(os.path.join(REAL, folder, "Original" if data == "cvc-clinicdb" else "images")))
    assert all(any(n.startswith(q["sample_id"] + ".") for n in names) for q in rows(run, "queried.csv"))


def test_block_mean_is_adaptive_avg_pool2d():
    """class_features' deterministic CUDA path (block_mean) computes F.adaptive_avg_pool2d's area average where
    the sizes divide, forward and backward."""
    p = torch.rand(2, 1, 64, 48, dtype=torch.float64, requires_grad=True)
    a, b = pwc.block_mean(p, (4, 3)), torch.nn.functional.adaptive_avg_pool2d(p, (4, 3))
    g = torch.randn_like(a)
    assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(a, p, g)[0], torch.autograd.grad(b, p, g)[0], atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: adaptive_avg_pool2d's backward raises there")
def test_fdl_grad_through_mask_under_deterministic_on_cuda():
    """--fdl-grad-through-mask with --deterministic: L_fdl's backward through the mask runs on CUDA (no op
    without a deterministic implementation) and gives the gradient of the default path. In float64: in float32
    the two modes' gradients differed by up to 2 % on single entries (H200, ce400f9), most likely the two modes'
    cuDNN algorithms rounding in TF32 (cudnn.allow_tf32, on by default on Ampere and later); float64 leaves
    only the loss's float32 rounding, about 1e-7 against entries up to 5e-4, where a block mean off by one pixel is off by 5e-4 (checked on the CPU)."""
    torch.manual_seed(0)
    model = pwc.UNet(3, 1, 4).cuda().double()
    xu = torch.rand(2, 3, 32, 32, device="cuda", dtype=torch.float64) * 2 - 1
    grads = []
    for deterministic in (False, True):
        common.seed_everything(0, deterministic)
        try:
            model.zero_grad(set_to_none=True)
            pwc.discrepancy_loss(model, xu, -1.0, through_mask=True).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        finally:
            common.seed_everything(0, False)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ---- score() and discrepancy_loss() on a network with known encoder features and logits -------------------
class KnownNet(torch.nn.Module):
    """encode(x) -> [x, FEATS[i]] and decode(feats) -> LOGITS[i] for image i (its first pixel holds i): the
    encoder output f_E and the prediction are known, so Eq. 1-3 and the entropy baseline can be computed by hand."""

    def __init__(self, feats, logits):
        super().__init__()
        self.register_buffer("feats", feats)
        self.register_buffer("logits", logits)
        self.feature_channels = feats.shape[1]

    def encode(self, x):
        return [x, self.feats[(x[:, 0, 0, 0] * 255).round().long()]]

    def decode(self, feats):
        return self.logits[(feats[0][:, 0, 0, 0] * 255).round().long()]


def known_net():
    # image 0: test_class_features_uncertainty_and_loss_by_hand's case (y1 = [[1, .5], [0, 0]] at 2x2, I = 17 /
    # sqrt(37 x 29)); image 1: a flat 0.25 prediction on other features (F1 = F0 / 3: I = 1)
    feats = torch.tensor([[[[2., 2.], [0., 0.]], [[0., 1.], [1., 1.]]],
                          [[[1., 3.], [0., 2.]], [[4., 0.], [1., 1.]]]])
    probs = torch.zeros(2, 4, 4)
    probs[0, :2, :3] = 1
    probs[1] = 0.25
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(2, dtype=torch.uint8)
    return KnownNet(feats, torch.logit(probs, eps=1e-7)[:, None]), x, feats, probs


def test_score_gives_eq1_to_3_and_the_mean_binary_entropy_by_hand():
    """F(x) = Avg(f_E(x)) (Eq. 3: the average over positions, not a max), I(x) from the sigmoid probabilities
    (Eq. 1-2) and the entropy baseline's mean two-term binary entropy (H(0.25) = 0.811278 bits, not -y log2 y)."""
    net, x, feats, probs = known_net()
    feat, unc, ent = pwc.score(net, x, np.arange(2), 2, torch.device("cpu"))
    assert feat.numpy() == pytest.approx(np.array([[1.0, 0.75], [1.5, 1.5]]))
    assert unc.tolist() == pytest.approx([17 / math.sqrt(37 * 29), 1.0], abs=1e-5)
    assert ent.tolist() == pytest.approx([0.0, 0.811278], abs=1e-4)
    # the pool order: score(idx) follows idx
    feat_r, unc_r, _ = pwc.score(net, x, np.array([1, 0]), 1, torch.device("cpu"))
    assert torch.equal(feat_r, feat.flip(0)) and torch.equal(unc_r, unc.flip(0))


def test_discrepancy_loss_uses_the_encoder_output_and_the_prediction():
    """Eq. 5 inside training: f_E is the encoder's last output (encode(x)[-1]), masked by the sigmoid of the
    decoder's logits; delta 0 gives the batch mean of I(x), delta 0.9 only image 0's share above the margin."""
    net, x, _, _ = known_net()
    xu = x.float() / 255
    i0 = 17 / math.sqrt(37 * 29)  # 0.5193
    assert pwc.discrepancy_loss(net, xu, 0.0).item() == pytest.approx((i0 + 1) / 2, abs=1e-5)
    assert pwc.discrepancy_loss(net, xu, 0.9).item() == pytest.approx((1 - 0.9) / 2, abs=1e-5)
    assert pwc.discrepancy_loss(net, xu[:1], 0.9).item() == pytest.approx(0.0, abs=1e-7)


def test_fdl_batches_come_from_the_unlabelled_pool(known_scorer, monkeypatch):
    """Eq. 5: L_fdl is an expectation over D_U. Every unlabelled batch that the training hook draws is
    made of images of the round's remaining pool (after the round's queries), never of labelled ones. (w/o CLU:
    the same L_fdl as ours, without the K-means.)"""
    seen = []
    monkeypatch.setattr(pwc, "discrepancy_loss", lambda model, xu, delta, through=False:
                        seen.append(xu.clone()) or torch.zeros(()))
    d, rounds, hooks, _ = known_scorer("wo-clu")
    data = common.load_data("synthetic", None, 32, 3, 0, n=N_FAKE, quiet=True)
    images = torch.as_tensor(data.x).float() / 255
    labelled = {int(r["sample_id"][3:]) for r in rows(d, "queried.csv")}
    assert len(hooks) == 2  # rounds 1 and 2
    for (model, extra_loss), (pool, picks) in zip(hooks, rounds):
        unlabelled = sorted(set(pool) - picks)
        seen.clear()
        for _ in range(6):
            extra_loss(model)
        xu = torch.cat(seen)
        assert len(xu) == 6 * 8  # batch size 8
        # each drawn image is one of the unlabelled pool, none a labelled one
        match = (xu[:, None] == images[None]).flatten(2).all(2)  # (drawn, data index)
        assert match[:, unlabelled].any(1).all()
        assert not match[:, sorted(labelled - set(unlabelled))].any()


def test_l_fdl_draws_leave_the_labelled_batches_alone(known_scorer, monkeypatch):
    """L_fdl's unlabelled batches come from a generator of their own: the labelled batches' order (drawn from
    the run's generator) is the same as without L_fdl (w/o DIS, which queries the same samples here)."""
    draws = []

    def train(model, opt, x, y, idx, epochs, batch_size, *, extra_loss=None, generator=None, **kw):
        for _ in range(epochs):
            if extra_loss is not None:
                extra_loss(model)
            draws.append(torch.randperm(len(idx), generator=generator).tolist())
        return [(e, 0.0, 0.0) for e in range(epochs)]

    monkeypatch.setattr(common, "train_epochs", train)
    known_scorer("ours")
    with_fdl = list(draws)
    draws.clear()
    known_scorer("wo-dis")
    assert len(draws) == 3 and draws == with_fdl


def test_l_fdl_in_the_rounds_of_ours_wo_unc_and_wo_clu_only():
    """Table 2: w/o DIS drops L_fdl (Eq. 7 reduces to L_seg), as do the baselines; ours, w/o UNC and w/o CLU
    train with it after the initial training (--fdl-initial: in it too); --lam 0 is L_seg alone. Written out
    here, not read from pwc.FDL_STRATEGIES, which test_every_strategy_end_to_end takes as its reference."""
    x, pool, cpu = torch.zeros(5, 3, 32, 32, dtype=torch.uint8), np.arange(5), torch.device("cpu")
    hook = lambda rnd, *flags: pwc.fdl_training(rnd, pwc.parse_args(list(flags)), x, pool, torch.Generator(), cpu)[0]
    with_fdl = {s for s in pwc.STRATEGIES if hook(1, "--strategy", s) is not None}
    assert with_fdl == {"ours", "wo-unc", "wo-clu"}
    assert hook(0, "--strategy", "ours") is None and hook(0, "--strategy", "ours", "--fdl-initial") is not None
    assert hook(1, "--strategy", "ours", "--lam", "0") is None
