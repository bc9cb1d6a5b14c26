"""common.Progress: the ETA's arithmetic on a fake clock (training cost per image-epoch, selection cost per
pool image scored, the rest per round), the plan of the usual protocol, and the fallback without a plan."""
import pytest

import common


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeRun:
    def __init__(self, clock, rows=()):
        self.clock, self.rows = clock, list(rows)

    def append_csv(self, name, row):  # epochs.csv: not this test's concern
        pass

    def elapsed(self):
        return self.clock.t - 1000.0

    def read_csv(self, name):
        assert name == "rounds.csv"
        return self.rows


def row(rnd, train_s, select_s, labeled=10):
    return {"round": rnd, "labeled": labeled, "pseudo": 0, "dice_mean": 0.5, "dice_std": 0.1, "iou_mean": 0.4,
            "train_s": train_s, "select_s": select_s}


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(common.time, "time", c)
    return c


# rounds 0, 1, 2: (images trained, epochs, pool images scored)
PLAN = [(10, 2, 0), (20, 1, 90), (30, 1, 70)]


def test_eta_counts_training_per_image_epoch_selection_per_image_and_the_rest(clock, capsys):
    p = common.Progress(FakeRun(clock), 4, plan=PLAN)
    # round 0, epoch 1 of 2 ends after 25 s: set-up and warm-up (a GPU's first epoch), not a rate: no ETA
    clock.t += 25
    p.epoch(0, 0, 2, 0.5)
    assert p.eta_s() is None
    assert "epoch 1/2 loss 0.5000 | 0m25s elapsed, ETA --" in capsys.readouterr().out
    # epoch 2 takes 10 s on 10 images: 1 s per image-epoch. Left: 20 + 30 image-epochs, 90 + 70 images to
    # score at (nothing measured yet) the training cost, no round finished.
    clock.t += 10
    p.epoch(0, 1, 2, 0.4)
    assert p.eta_s() == pytest.approx(50 + 160)
    assert "ETA 3m30s" in capsys.readouterr().out
    # round 0 ends 5 s later (test set, checkpoint: 5 s outside training and selection). Its train_s, 35 s,
    # holds the warm-up: the rate stays that of its epochs after the first, 1 s per image-epoch, not 1.75 s.
    clock.t += 5
    p.round(row(0, 35.0, 0.0))
    assert p.eta_s() == pytest.approx(50 * 1 + 160 * 1 + 2 * 5)
    # round 1: scoring 90 images takes 45 s, then an epoch of 20 images at 1.5 s each (30 s). Until the round
    # reports select_s, its selection is the gap (75 s) less one epoch at the cost so far (20 x 1 s): 55 s.
    clock.t += 45 + 30
    p.epoch(1, 0, 1, 0.3)
    assert p.eta_s() == pytest.approx(30 * 1 + 70 * 55 / 90 + 2 * 5)
    clock.t += 2
    p.round(row(1, 30.0, 45.0, 20))
    # measured: training (10 + 30) s / (10 + 20) image-epochs, selection 45 s / 90 images, the rest (5 + 2) / 2
    # per round
    assert p.eta_s() == pytest.approx(30 * 40 / 30 + 70 * 45 / 90 + 1 * 3.5)
    out = capsys.readouterr().out
    assert "round 1: labelled 20" in out and "ETA 1m18s" in out
    # the last round: nothing left
    clock.t += 35 + 45
    p.epoch(2, 0, 1, 0.2)
    clock.t += 3
    p.round(row(2, 45.0, 35.0, 30))
    assert p.eta_s() == 0


def test_without_a_plan_the_eta_is_epochs_left_at_the_mean_epoch_time(clock):
    """Today's behaviour for a script that passes no plan (and the bug the plan fixes: in the run above,
    102 s for 3 of 4 epochs says 34 s to go, where selection and the larger set leave about 80)."""
    p = common.Progress(FakeRun(clock), 4)
    for t, (rnd, e, epochs) in zip((10, 10, 82), ((0, 0, 2), (0, 1, 2), (1, 0, 1))):
        clock.t += t
        p.epoch(rnd, e, epochs, 0.5)
    assert p.eta_s() == pytest.approx(102 / 3 * 1)
    resumed = common.Progress(FakeRun(clock), 10, 4)  # --resume after 4 epochs: the rate of this session only
    clock.t += 6
    resumed.epoch(2, 0, 1, 0.5)
    assert resumed.eta_s() == pytest.approx(6 * 5)


def test_resume_takes_the_costs_of_the_rounds_already_done(clock):
    p = common.Progress(FakeRun(clock, [row(0, "20.0", "0.0"), row(1, "30.0", "45.0")]), 4, 3, plan=PLAN)
    assert p.eta_s() == pytest.approx(30 * 50 / 40 + 70 * 45 / 90)  # round 2 at the costs of rounds 0 and 1
    clock.t += 35 + 60  # round 2: selection, then its one epoch of 30 images at 2 s
    p.epoch(2, 0, 1, 0.2)
    assert p.eta_s() == pytest.approx(0)  # only the round's own evaluation is left, not yet measured


def test_plan_of_the_usual_protocol():
    # 10 labelled, 30 in the pool, 8 a round: scores 30, 22, 14, 6 (the last round takes the 6 left)
    assert common.Progress.plan(10, 8, 5, 20, 5, 30) == [(10, 20, 0), (18, 5, 30), (26, 5, 22), (34, 5, 14),
                                                         (40, 5, 6)]
    # random scores nothing; CEAL trains pseudo(r) pseudo-labelled images in round r too (the new ones leave
    # the pool): 2 x r, then 2 x r (r + 1) / 2
    assert common.Progress.plan(10, 8, 2, 20, 5, 30, scored=False) == [(10, 20, 0), (18, 5, 0), (26, 5, 0)]
    assert common.Progress.plan(10, 7, 2, 1, 1, 30, pseudo=lambda r: 2 * r) == [(10, 1, 0), (19, 1, 30), (28, 1, 21)]
    assert common.Progress.plan(10, 7, 3, 1, 1, 40, pseudo=lambda r: r * (r + 1)) == [(10, 1, 0), (19, 1, 40),
                                                                                      (30, 1, 31), (43, 1, 20)]
    assert common.Progress.plan(40, 7, 0, 3, 1, 0) == [(40, 3, 0)]  # the "full" baseline: one round


def test_a_resumed_processs_first_round_keeps_the_finished_rounds_selection_cost(clock):
    """In a resumed process, the time before the first round's first epoch holds the start-up (on a GPU the
    warm-up too) besides the selection: until the round reports select_s, the ETA keeps the selection cost of
    the finished rounds, 0.5 s per image here, instead of reading the gap as selection."""
    plan = PLAN + [(40, 1, 50)]
    p = common.Progress(FakeRun(clock, [row(0, "20.0", "0.0"), row(1, "30.0", "45.0")]), 5, 3, plan=plan)
    clock.t += 60 + 35 + 30 * 1.25  # start-up and warm-up, selection, round 2's one epoch of 30 images at 1.25 s
    p.epoch(2, 0, 1, 0.2)
    assert p.eta_s() == pytest.approx(40 * 50 / 40 + 50 * 45 / 90)  # round 3 at the finished rounds' costs
