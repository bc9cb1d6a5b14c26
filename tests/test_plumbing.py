"""The shared plumbing on hand-computed cases: evaluation threshold, soft Dice per image, the train loop's
epoch loss, batch order and augmentation, the ceiling's epochs, every RNG state and row on --resume, the
summary, config.json, split checks, the --vs-random verdict, patient splits, pool_used_up and save_picks.
Each test was written for a mutant of the rule that the rest of the suite let through (2026-11-27), and was
run once against it and failed."""
import argparse
import json
import math
import random

import numpy as np
import pytest
import torch

import collect
import common
import runfolder
from test_collect import fake_run

CPU = torch.device("cpu")


class Const(torch.nn.Module):
    """Predicts the logit `z` at every pixel."""
    def __init__(self, z):
        super().__init__()
        self.z = z

    def forward(self, x):
        return torch.full((len(x), 1) + tuple(x.shape[-2:]), float(self.z))


def test_evaluate_thresholds_at_one_half_strictly():  # M03
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    y = torch.ones(1, 2, 2, dtype=torch.uint8)
    logit = lambda p: math.log(p / (1 - p))
    assert common.evaluate(Const(logit(0.45)), x, y, [0], 1, CPU)[0].tolist() == [0.0]
    assert common.evaluate(Const(logit(0.55)), x, y, [0], 1, CPU)[0].tolist() == [1.0]


def test_soft_dice_is_a_per_image_mean_over_the_batch():  # M05, M06
    # logits 0 -> p = 0.5. image 0: (2*0.5 + 1) / (2 + 1 + 1) = 0.5 -> loss 0.5;
    # image 1 (two foreground pixels): (2*1 + 1) / (2 + 2 + 1) = 0.6 -> loss 0.4. Mean 0.45 (sum 0.9; pooled 0.5).
    target = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]]], dtype=torch.uint8)
    assert common.soft_dice_loss(torch.zeros(2, 1, 2, 2), target).item() == pytest.approx(0.45)


class W(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x[:, :1].float() * 0 + self.w * 0


def test_epoch_loss_is_the_mean_over_samples():  # M10
    # per-sample value 1, 2, 3 (batch 2: one batch of two, one of one): mean over samples 2 whatever the order
    x = torch.zeros(3, 3, 1, 1, dtype=torch.uint8)
    t = torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)
    for seed in range(4):
        model = W()
        losses = common.train(model, torch.optim.SGD(model.parameters(), lr=0.0), x, t, np.arange(3), 1, 2, device=CPU,
                              loss_fn=lambda out, tb: tb.float().mean() + out.sum() * 0,
                              generator=torch.Generator().manual_seed(seed))
        assert losses == [pytest.approx(2.0)]


def test_a_diverged_epoch_stops_the_run_with_a_clear_error():
    """A NaN (or inf) epoch loss: every later score would be NaN and every query arbitrary (CEAL's histogram and
    K-means would die of it with a traceback); train stops with a UserError naming the epoch, the lr and the fix,
    before the epoch is reported."""
    x, t = torch.zeros(3, 3, 1, 1, dtype=torch.uint8), torch.zeros(3, 1, 1, dtype=torch.uint8)
    seen = []
    for bad in (float("nan"), float("inf")):
        model = W()
        with pytest.raises(common.UserError, match=r"training diverged: epoch 2's mean loss is (nan|inf) \(lr now 0\.5\); "
                           r"start a new run with a lower --lr"):
            for _, loss, _ in common.train_epochs(model, torch.optim.SGD(model.parameters(), lr=0.5), x, t, np.arange(3),
                                                  3, 2, device=CPU,
                                                  loss_fn=lambda out, tb: out.sum() * 0 + (bad if seen else 1.0)):
                seen.append(loss)
        assert seen == [1.0]
        seen.clear()


def test_weights_made_not_finite_by_an_epochs_last_step_stop_the_run_too():
    """An epoch's mean loss is measured before each step: its last step can leave the weights NaN with the loss
    still finite (a labelled set of one batch does so at a high --lr), and the round would then score the pool
    and report a Dice on NaN. The weights are checked with the loss."""
    x, t = torch.zeros(3, 3, 1, 1, dtype=torch.uint8), torch.zeros(3, 1, 1, dtype=torch.uint8)
    model, steps = W(), []

    class Blows(torch.optim.SGD):  # the 4th step, epoch 2's last (two batches an epoch), leaves w NaN
        def step(self, closure=None):
            steps.append(super().step(closure))
            if len(steps) == 4:
                model.w.data.fill_(float("nan"))

    with pytest.raises(common.UserError, match=r"training diverged: epoch 2's mean loss is 1\.0, its weights not "
                                               r"finite \(lr now 0\.5\); start a new run with a lower --lr"):
        common.train(model, Blows(model.parameters(), lr=0.5), x, t, np.arange(3), 3, 2, device=CPU,
                     loss_fn=lambda out, tb: out.sum() * 0 + 1.0)


def test_outputs_not_finite_stop_before_anything_selects_on_them():
    """Weights can stay finite while the activations overflow (CEAL at --lr 10 on a labelled set of one batch):
    the pool's scores, the test Dice were NaN, and CEAL's histogram and polyp's K-means died of a traceback. Every
    prediction loop (forward_batches, under predict and evaluate, and mc_dropout) stops with one line once its
    last batch is out, whatever the batch that held the NaN; a finite model passes."""
    class Blown(torch.nn.Module):
        def __init__(self, bad_row):
            super().__init__()
            self.bad_row, self.drop = bad_row, torch.nn.Dropout(0.5)

        def forward(self, xb):
            out = self.drop(xb[:, :1].float() + 1)
            return torch.where((xb[:, :1] * 255).round() == self.bad_row, float("nan"), out)  # to_input: x / 255

    x = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    y = torch.zeros(5, 2, 2, dtype=torch.uint8)
    for bad_row in (0, 4):  # in the first batch, in the last
        model = Blown(bad_row)
        for loop in (lambda: common.predict(model, x, np.arange(5), 2, CPU),
                     lambda: common.evaluate(model, x, y, np.arange(5), 2, CPU),
                     lambda: common.mc_variance(model, x, np.arange(5), 3, 2, CPU)):
            with pytest.raises(common.UserError, match="the model's outputs hold NaN or inf: its training diverged"):
                loop()
    fine = Blown(9)
    assert common.predict(fine, x, np.arange(5), 2, CPU).shape == (5, 2, 2)
    t, nan = torch.ones(2), torch.tensor([1.0, float("nan")])  # an optional head's None, an int: not checked
    assert [bool(common.not_finite(o)) for o in ((t, None), (t, 3), [t, "x"], {"a": t}, torch.arange(3))] == [False] * 5
    assert [bool(common.not_finite(o)) for o in ((t, None, nan), {"a": (t, nan)})] == [True, True]
    assert common.mc_variance(fine, x, np.arange(5), 3, 2, CPU)[0].shape == (5,)


def test_batch_order_and_partial_epoch_come_from_the_generator():  # M08 (and M11 for whole epochs)
    """The run's generator alone decides the batch order and the ceiling's partial-epoch subset: the global
    torch seed changes nothing (a full run repeats from its --seed)."""
    x = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 3, 1, 1).contiguous()
    model = torch.nn.Conv2d(3, 1, 1)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        seen = []
        common.train(model, torch.optim.SGD(model.parameters(), lr=0.0), x, x[:, 0], np.arange(23), 1, 4, device=CPU,
                     loss_fn=lambda out, tb: seen.append(tb.flatten().tolist()) or out.sum() * 0,
                     generator=torch.Generator().manual_seed(0), steps=8)  # 6 steps an epoch + 2 partial
        runs.append(seen)
    assert runs[0] == runs[1] and len(runs[0]) == 8


def test_ceiling_epochs_round_up():  # M14, M15
    args = argparse.Namespace(strategy="full", initial=10, query=7, rounds=2, epochs_initial=2, epochs=1, batch_size=4)
    # plan: 10 x 2 epochs (3 steps each), 17 x 1 (5), 24 x 1 (6) = 17 steps; 40 per epoch = 10 steps -> 2 epochs
    assert common.ceiling(args, 40) == (0, 2, 17)
    # pool after round 0 = 12 - 10 = 2 < query: round 1 takes 2 (12 images, 3 steps), then the pool is empty:
    # 2 x 3 + 3 = 9 steps (n_train instead of n_train - initial would plan 17 + 24)
    assert common.ceiling(args, 12) == (0, 3, 9)


def _args(**kw):
    base = dict(resume=None, out=None, data="synthetic", strategy="s", seed=0, device="cpu", workers=0, amp=False,
                rounds=2)
    return argparse.Namespace(**dict(base, **kw))


def test_resume_restores_every_rng_state(tmp_path):  # M22, M23, M24, M25
    run = common.Run("x.py", _args(out=str(tmp_path)), CPU)
    run.log_round({c: 0 for c in common.ROUND_COLUMNS})
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng, gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    rng.random(), torch.rand(1, generator=gen)
    run.save_checkpoint({"round": 0, "model": model.state_dict(), "opt": opt.state_dict(),
                         "rng_select": rng.bit_generator.state, "rng_batches": gen.get_state()})
    draw = lambda rng, gen: (random.random(), np.random.random(), torch.rand(1).item(), rng.random(),
                             torch.rand(1, generator=gen).item())
    want = draw(rng, gen)
    rng2, gen2 = np.random.default_rng(99), torch.Generator().manual_seed(99)
    nxt, _ = common.Run("x.py", _args(resume=run.dir), CPU).resume(model, opt, rng2, gen2)
    assert nxt == 1 and draw(rng2, gen2) == want


def test_resume_drops_whole_rows_of_the_unfinished_round(tmp_path):  # M27
    run = common.Run("x.py", _args(out=str(tmp_path)), CPU)
    run.append_csv("rounds.csv", [dict({c: 0 for c in common.ROUND_COLUMNS}, round=r) for r in range(3)])
    run.append_csv("epochs.csv", [{"round": r, "epoch": 1, "loss": 0.5} for r in range(4)])  # round 3 unfinished
    torch.save({"rng_python": random.getstate(), "rng_numpy": np.random.get_state(), "rng_torch": torch.get_rng_state(),
                "round": 2}, run.path("checkpoint.pt"))
    common.Run("x.py", _args(resume=run.dir), CPU).load_checkpoint()
    assert [r["round"] for r in run.read_csv("epochs.csv")] == ["0", "1", "2"]


def test_resume_keeps_the_elapsed_time_of_the_rounds_done(tmp_path):  # M28
    run = common.Run("x.py", _args(out=str(tmp_path)), CPU)
    run.log_round({c: 0 for c in common.ROUND_COLUMNS})
    run.offset_s = 1000.0
    run.save_checkpoint({"round": 0})
    again = common.Run("x.py", _args(resume=run.dir), CPU)
    again.load_checkpoint()
    assert 1000.0 <= again.elapsed() < 1100.0


def test_summary_counts_query_rounds_and_copies_the_last_row(tmp_path):  # M29
    run = common.Run("x.py", _args(out=str(tmp_path)), CPU)
    for r, n in ((0, 6), (1, 10), (2, 14)):
        run.log_round(common.round_row(r, n, 0, np.array([0.5, 1.0]), np.array([0.25, 1.0]), 1.0, 0.0))
    run.finish()
    s = json.load(open(run.path("summary.json")))
    assert (s["rounds"], s["labeled"], s["pseudo"], s["final_dice"], s["final_dice_std"], s["final_iou"]) == \
        (2, 14, 0, 0.75, 0.25, 0.625)


def test_a_resume_does_not_record_its_resume_flag(tmp_path):  # M30
    args = _args(out=str(tmp_path))
    run = common.Run("x.py", args, CPU)
    run.update_config(args)
    again = _args(resume=run.dir)
    common.Run("x.py", again, CPU).update_config(again)
    assert common.read_json(run.path("config.json"))["args"]["resume"] is None


def test_config_records_versions_device_and_threads(tmp_path):  # M31
    run = common.Run("x.py", _args(out=str(tmp_path)), CPU)
    cfg = common.read_json(run.path("config.json"))
    assert {"script", "args", "command", "commit", "device", "device_name", "threads", "python", "torch", "numpy",
            "started"} <= set(cfg)
    assert cfg["threads"] == torch.get_num_threads() and cfg["device"] == "cpu" and cfg["torch"] == torch.__version__


def test_config_names_the_cpu_by_vendor_family_and_model(tmp_path, monkeypatch):
    """Two CPUs can train the same run to other floats (docs/behaviour_checks.md): config.json names the CPU as
    /proc/cpuinfo's first processor does (`x86_64` alone said nothing), with the instruction set torch's kernels use."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
                       "model name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\nvendor_id\t: OtherVendor\n")
    real_open, real_isfile = open, runfolder.os.path.isfile
    monkeypatch.setattr(runfolder.os.path, "isfile", lambda p: p == "/proc/cpuinfo" or real_isfile(p))
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    name = runfolder.device_name(CPU)
    monkeypatch.undo()
    assert name.endswith(f"GenuineIntel family 6 model 207, {torch.backends.cpu.get_cpu_capability()}"), name
    run = common.Run("x.py", _args(out=str(tmp_path / "runs")), CPU)
    assert common.read_json(run.path("config.json"))["device_name"] == runfolder.device_name(CPU)


def test_resume_refuses_data_with_samples_added(tmp_path):  # M34
    args = _args(out=str(tmp_path), split=[24, 6, 10], initial=None, query=None, oracle="simulated", data_dir=None)
    run = common.Run("x.py", args, CPU)
    common.split_data(run, common.make_synthetic(40, 16), args, 4, 2, 100)
    again = _args(resume=run.dir, split=None, initial=None, query=None, oracle="simulated", data_dir=None)
    run2 = common.Run("x.py", again, CPU)
    more = common.make_synthetic(48, 16)  # the 40 samples still there, 8 more: the seed splits them otherwise
    with pytest.raises(common.UserError, match="now differs from the run's"):
        common.split_data(run2, more, again, 4, 2, 100)


def test_vs_random_uses_the_larger_std(tmp_path):  # M39
    for seed in (0, 1):  # at 20: rule 0.3 / 0.7 (mean 0.5, std 0.2828), random 0.7 / 0.7 (std 0): 0.5 >= 0.7 - 0.2828
        fake_run(tmp_path, f"m{seed}", "example_tta", "tta", seed, [0.5, 0.3 + 0.4 * seed])
        fake_run(tmp_path, f"r{seed}", "example_tta", "random", seed, [0.5, 0.7])
    rows = {r["labeled"]: r for r in collect.vs_random(collect.collect([str(tmp_path)]))}
    assert rows[20]["verdict"] == "within 1 std"


def test_a_patient_that_ties_stays_out():  # M42
    # 5 patients of 4 slices, test target 6: the first patient (0 -> 4) brings it closer, a second would tie
    # (|8 - 6| == |4 - 6|) and stays out: 4 test slices, not 8
    groups = np.repeat([f"P{g}" for g in range(5)], 4)
    d = common.Data(np.zeros((20, 1, 4, 4), np.uint8), np.zeros((20, 4, 4), np.uint8), [f"s{i}" for i in range(20)],
                    {}, groups, "grouped")
    for seed in range(3):
        tr, va, te = common.make_splits(d, (4, 0, 6), seed)
        assert len(te) == 4 and len(va) == 0 and len(tr) == 4


def test_pool_used_up_only_in_a_query_round_with_an_empty_pool():  # M18, M46
    assert common.pool_used_up(1, np.zeros(0, np.int64)) is True
    assert common.pool_used_up(0, np.zeros(0, np.int64)) is False
    assert common.pool_used_up(2, np.array([3])) is False


def test_save_picks_shows_up_to_per_group_of_each_group(tmp_path, monkeypatch):  # M44
    got = {}
    monkeypatch.setattr(common, "picks_sheet", lambda path, data, rows, probs, groups, scores: got.update(rows=rows, n=len(probs)))
    run = common.Run("x.py", _args(out=str(tmp_path)), CPU)
    x = torch.zeros(40, 3, 4, 4, dtype=torch.uint8)
    common.save_picks(run, 1, Const(0.0), None, x, {"high": np.arange(20), "low": np.arange(20, 23)}, None, 8, CPU)
    assert got["rows"] == [("high", i) for i in range(16)] + [("low", i) for i in (20, 21, 22)] and got["n"] == 19


def test_train_uses_the_augmented_mask():  # M12
    """augment(xb, yb) returns the pair the step trains on: a geometric transform moves the mask with the image."""
    seen = []
    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    model = torch.nn.Conv2d(3, 1, 1)
    common.train(model, torch.optim.SGD(model.parameters(), lr=0.0), x, x[:, 0], np.arange(4), 1, 2, device=CPU,
                 loss_fn=lambda out, tb: seen.append(tb.unique().tolist()) or out.sum() * 0,
                 augment=lambda xb, yb: (xb, torch.full_like(yb, 7)))
    assert seen == [[7], [7]]


def test_split_data_derives_the_pseudo_step_on_other_data(tmp_path):  # M35
    """CEAL's 20 pseudo-labels of 1600 become the same share of another pool: round(24 x 20 / 100) = 5."""
    args = _args(out=str(tmp_path), split=[24, 6, 10], initial=None, query=None, oracle="simulated", data_dir=None,
                 pseudo_step=None)
    run = common.Run("x.py", args, CPU)
    common.split_data(run, common.make_synthetic(40, 16), args, 4, 2, 100, pseudo=20)
    assert args.pseudo_step == 5
