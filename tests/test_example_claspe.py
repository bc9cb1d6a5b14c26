"""example_claspe.py: the power noising, the beta schedule and the class stratification on hand-made scores,
the two scores on hand-made probability maps, and the script end to end with --resume."""
import csv
import os

import numpy as np
import pytest
import torch

import common
import example_claspe as ex
import interface
from conftest import run_dir_from, run_script


def test_power_noise_without_noise_is_top_k():
    s = np.random.default_rng(3).random(50)
    order = np.argsort(-ex.power_noise(s, np.inf, np.random.default_rng(0)), kind="stable")
    assert list(np.arange(50)[order[:10]]) == list(common.top_k(np.arange(50), s, 10))


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_power_noise_samples_in_proportion_to_score_to_the_beta(beta):
    """Gumbel-max: the first pick is i with probability s_i^beta / sum s^beta; the first two are a draw
    without replacement (Plackett-Luce): P(i in top 2) = p_i + sum_{j != i} p_j p_i / (1 - p_j)."""
    s, n = np.array([1.0, 2.0, 3.0, 4.0]), 20000
    noised = ex.power_noise(np.tile(s, (n, 1)), beta, np.random.default_rng(0))
    p = s ** beta / (s ** beta).sum()
    first = np.bincount(noised.argmax(1), minlength=4) / n
    assert first == pytest.approx(p, abs=0.015)
    top2 = np.argsort(-noised, 1)[:, :2]
    in_top2 = np.array([(top2 == i).any(1).mean() for i in range(4)])
    expected = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    assert in_top2 == pytest.approx(expected, abs=0.015)


def test_schedule_rises_geometrically_from_start_to_end():
    betas = [ex.schedule(r, 4, 1.0, 40.0) for r in (1, 2, 3, 4)]
    assert betas == pytest.approx([1.0, 40 ** (1 / 3), 40 ** (2 / 3), 40.0])  # noise scale 1/beta decays
    assert ex.schedule(1, 1, 2.0, 40.0) == 2.0  # a single query round: the start value


def test_stratified_split_on_hand_made_scores():
    """int(k * 0.66) picks by the foreground score F, the rest by the entropy H among the others."""
    pool = np.arange(100, 107)
    H = np.array([10, 9, 8, 1, 2, 3, 7.0])       # plain entropy top 5: 100, 101, 102, 106, 105
    F = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.05])
    fg, ent, _, _ = ex.claspe(pool, H, F, 5, np.inf, np.random.default_rng(0))
    assert list(fg) == [103, 104, 105] and list(ent) == [100, 101]
    fg, ent, _, _ = ex.claspe(pool, H, F, 1, np.inf, np.random.default_rng(0))
    assert list(fg) == [] and list(ent) == [100]  # int(0.66) = 0: a query of one goes to the entropy stratum
    rng = np.random.default_rng(1)
    for k, k_fg in ((4, 2), (15, 9), (20, 13)):
        pool, H, F = np.arange(40), rng.random(40), rng.random(40)
        fg, ent, _, _ = ex.claspe(pool, H, F, k, 1.0, rng)
        assert (len(fg), len(ent)) == (k_fg, k - k_fg) and len(set(fg) | set(ent)) == k


def test_the_two_strata_get_independent_noise():
    """Each stratum's ranking draws its own Gumbel noise (F's first, then H's, from the run's generator): one
    draw shared by both would tie the two strata's picks together."""
    rng, pool = np.random.default_rng(5), np.arange(30)
    H, F = rng.random(30) + 0.1, rng.random(30) + 0.1
    _, _, nf, nh = ex.claspe(pool, H, F, 6, 2.0, np.random.default_rng(0))
    replay = np.random.default_rng(0)
    assert nf == pytest.approx(ex.power_noise(F, 2.0, replay)) and nh == pytest.approx(ex.power_noise(H, 2.0, replay))
    assert not np.allclose(nf - np.log(F), nh - np.log(H))


def test_flag_defaults():
    a = ex.parse_args([])
    assert (a.strategy, a.beta_start, a.beta_end, a.fg_share) == ("claspe", 1.0, 40.0, 0.66)


@pytest.mark.parametrize("strategy, flags, stratum", [("entropy", [], "oracle"),
                                                      ("claspe", ["--fg-share", "0"], "oracle/entropy"),
                                                      ("claspe", ["--fg-share", "1"], "oracle/fg")])
def test_picks_follow_known_scores(strategy, flags, stratum, tmp_path, monkeypatch):
    """main() in-process with entropy_scores replaced by two known, different permutations H and F of the data
    indices: --strategy entropy queries the top --query of H; claspe with beta 1e9 (no noise to speak of) and
    --fg-share 0 (1) the top of H (F), each pick logged in its stratum in pool_scores.csv."""
    perm = np.random.default_rng(7).permutation
    H, F = perm(60) + 1.0, perm(60) + 1.0
    monkeypatch.setattr(ex, "entropy_scores", lambda model, x, pool, *a: (H[np.asarray(pool)], F[np.asarray(pool)]))
    run = ex.main(["--split", "40", "10", "10", "--image-size", "32", "--width", "4", "--initial", "6", "--query", "4",
                   "--rounds", "2", "--epochs-initial", "1", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                   "--strategy", strategy, "--beta-start", "1e9", "--beta-end", "1e9", *flags, "--out", str(tmp_path)])
    score = F if stratum == "oracle/fg" else H
    index = lambda sid: int(sid[3:])
    q = list(csv.DictReader(open(os.path.join(run, "queried.csv"))))
    ps = list(csv.DictReader(open(os.path.join(run, "pool_scores.csv"))))
    for rnd in ("1", "2"):
        rows = [r for r in ps if r["round"] == rnd]
        top = sorted((index(r["sample_id"]) for r in rows), key=lambda i: -score[i])[:4]
        assert sorted(index(r["sample_id"]) for r in q if r["round"] == rnd) == sorted(top)
        assert {index(r["sample_id"]) for r in rows if r["stratum"] == stratum} == set(top)


def test_scores_on_hand_made_probability_maps():
    """Two images with the same entropy, one predicted foreground (p = 0.8), one predicted empty (p = 0.2):
    H_i is equal, F_i = sum H(p) p is four times larger for the foreground one; a sure empty one scores ~0."""
    class Prob(torch.nn.Module):  # the input's first channel, read as the foreground probability
        def forward(self, x):
            return torch.logit(x[:, :1], eps=1e-6)

    x = torch.zeros((3, 3, 4, 4), dtype=torch.uint8)
    x[0], x[1] = 51, 204  # p = 0.2 and 0.8
    H, F = ex.entropy_scores(Prob(), x, np.arange(3), 2, torch.device("cpu"))
    h = -(0.2 * np.log2(0.2) + 0.8 * np.log2(0.8))
    assert H[:2] == pytest.approx([16 * h, 16 * h], rel=1e-5) and F[:2] == pytest.approx([3.2 * h, 12.8 * h], rel=1e-5)
    assert H[2] < 1e-3 and F[2] < 1e-6


def test_script_end_to_end_and_resume(tmp_path):
    tiny = ["--split", 40, 10, 10, "--image-size", 32, "--width", 4, "--initial", 6, "--query", 4, "--rounds", 2,
            "--epochs-initial", 1, "--epochs", 1, "--batch-size", 8]
    full = run_dir_from(run_script("example_claspe.py", *tiny, "--out", tmp_path / "a"))
    out = run_script("example_claspe.py", *tiny, "--out", tmp_path / "b", check=False,
                     env_extra={"ALSEG_STOP_AFTER_ROUND": "1"})
    assert out.returncode == 3
    part = str(next((tmp_path / "b").iterdir()))
    run_script("example_claspe.py", "--resume", part)
    read = lambda d, f: open(os.path.join(d, f)).read()
    assert read(full, "queried.csv") == read(part, "queried.csv") and read(full, "queried.csv").count("\n") == 1 + 6 + 2 * 4
    interface.assert_interface("example_claspe.py", [full, part])  # pool_scores.csv, picks/round_K.png
    queried = list(csv.DictReader(open(os.path.join(full, "queried.csv"))))
    scores = list(csv.DictReader(open(os.path.join(full, "pool_scores.csv"))))
    for rnd, beta in (("1", 1.0), ("2", 40.0)):  # the logged numbers explain the picks
        rows = [r for r in scores if r["round"] == rnd]
        picked = {r["sample_id"] for r in rows if r["picked"] == "oracle-claspe"}
        assert picked == {q["sample_id"] for q in queried if q["round"] == rnd} and len(rows) == 38 - 4 * int(rnd)
        assert all(float(r["beta"]) == beta for r in rows)
        fg = [r for r in rows if r["stratum"] == "oracle/fg"]
        ent = [r for r in rows if r["stratum"] == "oracle/entropy"]
        assert len(fg) == len(ent) == 2 and {r["sample_id"] for r in fg + ent} == picked
        col = lambda c, rs: [float(r[c]) for r in rs]  # 6 digits in the CSV: ties allowed
        assert min(col("noised_fg", fg)) >= max(col("noised_fg", [r for r in rows if r not in fg]))
        assert min(col("noised_entropy", ent)) >= max(col("noised_entropy", [r for r in rows if r not in fg + ent]))
