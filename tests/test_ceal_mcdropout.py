"""ceal_mcdropout.py: the four CEAL groups on hand-made scores, and the script end to end (synthetic, the
real LGG sample files, --resume, seeding, strategies, bad input)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

import common
from conftest import REAL, run_dir_from, run_script

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


def test_ceal_groups_small_pool_serves_the_oracle_first():
    low, high, band, pseudo = common.ceal_groups(np.arange(6.0), 2, 2, 1, 10, np.random.default_rng(0))
    # 80 bins over 0..5: every bin holds at most one score, the mode is bin 0 and the band (up to bin 7,
    # scores <= 0.44) holds only score 0, already in group 1: the band is filled with the next-lowest score
    assert sorted(low) == [0, 1] and sorted(high) == [4, 5] and list(band) == [2] and list(pseudo) == [3]
    assert set(np.concatenate([low, high, band, pseudo])) == set(range(6))


def read(run, name):
    return list(csv.DictReader(open(os.path.join(run, name))))


def test_end_to_end_resume_and_seed(tmp_path):
    full = run_dir_from(run_script("ceal_mcdropout.py", *TINY, "--out", tmp_path / "a"))
    rows = read(full, "rounds.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert [int(r["labeled"]) for r in rows] == [10, 17, 24] and [int(r["pseudo"]) for r in rows] == [0, 2, 6]
    q = read(full, "queried.csv")
    assert {r["how"] for r in q} == {"initial", "oracle-lowest", "oracle-highest", "oracle-band", "pseudo"}
    assert len({r["sample_id"] for r in q}) == len(q) == 10 + 7 * 2 + 2 + 4   # nothing queried twice
    train_ids = set(json.load(open(os.path.join(full, "splits.json")))["train"])
    assert {r["sample_id"] for r in q} <= train_ids
    for f in ("summary.json", "learning_curve.png", "panel.png", "uncertainty_hist.png", "uncertainty_vs_dice.png",
              "checkpoint.pt", "config.json", "epochs.csv", "pool_scores.csv"):
        assert os.path.isfile(os.path.join(full, f)), f
    assert json.load(open(os.path.join(full, "summary.json")))["final_dice"] == pytest.approx(float(rows[-1]["dice_mean"]), abs=1e-5)

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

    # another seed: other queries
    other = run_dir_from(run_script("ceal_mcdropout.py", *TINY, "--seed", 1, "--out", tmp_path / "c"))
    assert read(other, "queried.csv") != q


def test_interface_check(tmp_path):
    run = run_dir_from(run_script("ceal_mcdropout.py", *TINY, "--rounds", 1, "--out", tmp_path))
    checker = os.path.join(REAL, "..", "..", "tools", "check_run.py")
    if not os.path.isfile(checker):
        pytest.skip("../shared/tools/check_run.py absent")
    out = run_script(checker, "ceal_mcdropout.py", run, check=False, device=False)
    assert out.returncode == 0 and "interface ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("strategy,labeled", [("random", [10, 17]), ("full", [40])])
def test_baselines(tmp_path, strategy, labeled):
    run = run_dir_from(run_script("ceal_mcdropout.py", *TINY, "--rounds", 1, "--strategy", strategy, "--out", tmp_path))
    rows = read(run, "rounds.csv")
    assert [int(r["labeled"]) for r in rows] == labeled and all(r["pseudo"] == "0" for r in rows)


def test_real_lgg_layout_as_downloaded(tmp_path):
    if not os.path.isdir(os.path.join(REAL, "kaggle_3m")):
        pytest.skip("real samples absent")
    run = run_dir_from(run_script("ceal_mcdropout.py", "--data", "lgg", "--data-dir", os.path.join(REAL, "kaggle_3m"),
                                  "--split", 2, 0, 2, "--initial", 1, "--query", 1, "--rounds", 1, "--image-size", 32,
                                  "--width", 4, "--epochs-initial", 1, "--epochs", 1, "--mc-passes", 2, "--out", tmp_path))
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
    assert "--data isic2017 needs --data-dir" in fails("--data", "isic2017")
    assert "labelling budget 1100" in fails(*TINY, "--initial", 1000, "--query", 50)
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    assert "wrong: expected the official layout" in fails("--data", "isic2017", "--data-dir", tmp_path / "wrong")
    assert "nowhere: folder not found" in fails("--data", "lgg", "--data-dir", tmp_path / "nowhere")
