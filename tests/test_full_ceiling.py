"""The ceiling, --strategy full, in every script: the same model on the whole training pool for the optimiser
steps of the active-learning run with the same flags (common.ceiling, common.al_steps of the run's plan,
common.train_epochs(steps=))."""
import csv
import importlib
import os

import numpy as np
import pytest
import torch

import common

TINY = ["--device", "cpu", "--image-size", 32, "--width", 4, "--split", 40, 8, 12, "--initial", 10, "--query", 7,
        "--rounds", 2, "--epochs-initial", 2, "--epochs", 1, "--batch-size", 4]


def test_train_takes_exactly_the_steps_asked():
    x = torch.randint(0, 255, (23, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 2, (23, 8, 8), dtype=torch.uint8)
    model = torch.nn.Conv2d(3, 1, 1)
    for steps in (1, 5, 6, 13, 30):  # 6 steps an epoch (23 / 4): partial, whole, whole + partial
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        taken = []
        opt.step = lambda *a, **k: taken.append(1)
        epochs = [e for e, _, _ in common.train_epochs(model, opt, x, y, np.arange(23), 99, 4, device=torch.device("cpu"),
                                                       steps=steps, generator=torch.Generator().manual_seed(0))]
        assert len(taken) == steps and epochs == list(range(-(-steps // 6)))


def test_al_steps_counts_the_plan():
    # 10 labelled for 2 epochs, then 17 and 24 for 1 (batch 4): 2 x 3 + 5 + 6 = 17 steps
    assert common.al_steps(common.Progress.plan(10, 7, 2, 2, 1, 30), 4) == 17
    # the pool runs out after one query of 7 (only 5 left, then none)
    assert common.al_steps(common.Progress.plan(10, 7, 3, 2, 1, 5), 4) == 2 * 3 + 4
    # CEAL's pseudo-labels are trained on too: 10 + 7 + 2 pseudo in round 1
    assert common.al_steps(common.Progress.plan(10, 7, 1, 2, 1, 30, True, lambda r: 2 * r), 4) == 6 + 5


@pytest.mark.parametrize("mode", ["total", "per-iteration", "redraw"])
def test_ceal_ceiling_matches_its_al_run_when_the_pool_runs_short(tmp_path, monkeypatch, mode):
    """CEAL's pseudo-labels in a pool too small for them (30 after round 0: 7 queried and 4, 8, 12 pseudo-labels
    asked per round): the ceiling's steps are those the active-learning run takes, counted from its own calls
    of common.train_epochs (each mode takes fewer pseudo-labels than asked in a different round; redraw's stay in the
    pool)."""
    calls = []
    train = common.train_epochs

    def spy(model, opt, x, target, idx, epochs, batch_size, **k):
        calls.append((len(idx), epochs, batch_size, k.get("steps")))
        return train(model, opt, x, target, idx, epochs, batch_size, **k)

    monkeypatch.setattr(common, "train_epochs", spy)
    ceal = importlib.import_module("ceal_mcdropout")
    flags = [*map(str, TINY), "--rounds", "3", "--pseudo-step", "4", "--mc-passes", "2", "--pseudo-mode", mode]
    ceal.main([*flags, "--out", str(tmp_path / "al")])
    al = sum(e * -(-n // b) for n, e, b, _ in calls)
    calls.clear()
    ceal.main([*flags, "--strategy", "full", "--out", str(tmp_path / "full")])
    assert [s for *_, s in calls if s is not None] == [al]  # (train calls itself for the whole epochs)


@pytest.mark.parametrize("script,extra,steps", [
    ("example_tta", [], 17), ("example_claspe", [], 17), ("polyp_weighted_cluster", [], 17),
    ("ssl_coldstart", ["--ssl-epochs", 1, "--channels", 3], 17),
    ("ceal_mcdropout", ["--pseudo-step", 2, "--mc-passes", 2], 2 * 3 + 5 + 7)])  # 10, 19, 28 (2 + 2 x 2 pseudo)
def test_full_trains_the_al_runs_steps_on_the_whole_pool(tmp_path, monkeypatch, script, extra, steps):
    asked = []
    train = common.train_epochs
    monkeypatch.setattr(common, "train_epochs", lambda *a, **k: asked.append(k.get("steps")) or train(*a, **k))
    run = importlib.import_module(script).main([*map(str, TINY + extra), "--strategy", "full", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(os.path.join(run, "rounds.csv"))))
    assert [int(r["labeled"]) for r in rows] == [40]  # the whole pool, one round
    queried = list(csv.DictReader(open(os.path.join(run, "queried.csv"))))
    assert len(queried) == 40 and {(r["round"], r["how"]) for r in queried} == {("0", "full")}
    assert [s for s in asked if s is not None] == [steps]
