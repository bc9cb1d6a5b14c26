"""region_uncertainty.py: the three image scores and their direction, partial annotation and its two
percentages, the ResNet-18 encoder loading torchvision's keys, the augmentation keeping image and mask
aligned, the full baseline's step count, and the script end to end (least confidence, --partial, --resume,
full, MC dropout, --tables) on tiny synthetic data."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import region_uncertainty as ru
import unet
from conftest import ROOT, run_dir_from, run_script

TINY = ["--split", 40, 10, 10, "--image-size", 64, "--width", 4, "--rounds", 2, "--epochs", 1, "--epochs-initial", 1,
        "--batch-size", 8, "--initial", 8, "--query", 4, "--mc-passes", 3]


def read_csv(path):
    return list(csv.DictReader(open(path)))


# ---------------------------------------------------------------------------------------------------------
# Eqs. 1-3 against hand-computed pixel maps, and which images each rule queries
# ---------------------------------------------------------------------------------------------------------
P = torch.tensor([[[0.5, 0.5], [0.5, 0.5]],      # image 0: every pixel at 0.5, the least confident
                  [[0.0, 1.0], [1.0, 0.0]],      # image 1: certain everywhere
                  [[0.25, 0.75], [0.5, 1.0]]])   # image 2: in between


def test_least_confidence_hand_computed_and_queries_the_lowest_sum():
    # sum |0.5 - y|: 0; 0.5 * 4 = 2; 0.25 + 0.25 + 0 + 0.5 = 1
    assert torch.allclose(ru.least_confidence(P), torch.tensor([0.0, 2.0, 1.0]))
    pool = np.array([10, 11, 12])
    assert list(ru.query(pool, ru.least_confidence(P).numpy(), 2, "least-confidence")) == [10, 12]
    assert list(ru.query(pool, ru.least_confidence(P).numpy(), 1, "least-confidence")) == [10]


def test_entropy_printed_and_two_term_hand_computed():
    p = torch.tensor([[[0.5, 0.25], [1.0, 0.0]]])
    # -y log2 y: 0.5 + 0.5 + 0 + 0 (p = 0 is clamped to 1e-7: adds 2.3e-6)
    assert ru.entropy(p, two_term=False).item() == pytest.approx(1.0, abs=1e-5)
    # H(0.5) + H(0.25) = 1 + 0.811278
    assert ru.entropy(p, two_term=True).item() == pytest.approx(1 + 0.811278, abs=1e-5)
    # on P: printed entropy 4 x 0.5 = 2; 0; 0.5 + 0.311278 + 0.5 + 0 -> query the highest
    s = ru.entropy(P).numpy()
    assert s == pytest.approx([2.0, 0.0, 1.311278], abs=1e-5)
    assert list(ru.query(np.array([10, 11, 12]), s, 2, "entropy")) == [10, 12]


def test_mc_dropout_std_hand_computed_and_queries_the_highest():
    var = torch.tensor([[[0.04, 0.01], [0.0, 0.25]],   # std 0.2 + 0.1 + 0 + 0.5 = 0.8
                        [[0.0, 0.0], [0.0, 0.0]],      # 0
                        [[0.09, 0.16], [0.0, 0.0]]])   # 0.3 + 0.4 = 0.7
    s = ru.mc_dropout_std(var)
    assert torch.allclose(s, torch.tensor([0.8, 0.0, 0.7]))
    assert list(ru.query(np.array([10, 11, 12]), s.numpy(), 2, "mc-dropout")) == [10, 12]
    # Eq. 3 from N samples: the std (1/N normalisation) of [0.2, 0.4, 0.6, 0.8] is sqrt(0.05)
    samples = torch.tensor([0.2, 0.4, 0.6, 0.8])
    var = (samples ** 2).mean() - samples.mean() ** 2
    assert ru.mc_dropout_std(var.view(1, 1, 1)).item() == pytest.approx(math.sqrt(0.05), abs=1e-6)


class LookupModel(nn.Module):
    """Returns a stored logit map per image; the image's first pixel holds its index."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.logit(probs.clamp(1e-6, 1 - 1e-6)))

    def forward(self, x):
        return self.logits[(x[:, 0, 0, 0] * 255).round().long()][:, None]


@pytest.mark.parametrize("strategy, expected", [("least-confidence", [0, 2]), ("entropy", [0, 2])])
def test_score_pool_scores_the_model_probabilities(strategy, expected):
    x = torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(3, dtype=torch.uint8)
    args = type("A", (), dict(strategy=strategy, batch_size=2, amp=False, entropy="printed", mc_passes=2))
    scores = ru.score_pool(LookupModel(P), x, np.arange(3), args, torch.device("cpu"))
    want = ru.least_confidence(P) if strategy == "least-confidence" else ru.entropy(P)
    assert scores == pytest.approx(want.numpy(), abs=1e-4)
    assert sorted(ru.query(np.arange(3), scores, 2, strategy)) == expected


# ---------------------------------------------------------------------------------------------------------
# Sec. III-B: partial annotation and the two percentages
# ---------------------------------------------------------------------------------------------------------
def test_partial_annotation_hand_made_case():
    p = torch.tensor([[[0.1, 0.3, 0.45], [0.55, 0.7, 0.9]]])
    gt = torch.tensor([[[0, 1, 1], [0, 1, 1]]], dtype=torch.uint8)
    # tau_u 0.25: |0.5 - y| = .4 .2 .05 / .05 .2 .4 -> uncertain at positions 1, 2, 3, 4 (oracle); 0 and 5 from
    # the prediction binarised at tau_b 0.5: 0 and 1
    t, unc = ru.partial_annotation(p, gt, 0.25, 0.5)
    assert unc.flatten().tolist() == [False, True, True, True, True, False]
    assert t.flatten().tolist() == [0, 1, 1, 0, 1, 1]
    pos, verify = ru.annotation_percentages(unc, gt)
    assert pos == pytest.approx(100 * 3 / 6) and verify == pytest.approx(100 * 4 / 6)
    # tau_b 0.05: the certain pixel at 0.1 becomes positive
    t, _ = ru.partial_annotation(p, gt, 0.25, 0.05)
    assert t.flatten().tolist() == [1, 1, 1, 0, 1, 1]
    # tau_u 0.125: only 0.45 and 0.55 go to the oracle; 0.3 -> 0 and 0.7 -> 1 from the model (tau_b 0.5)
    t, unc = ru.partial_annotation(p, gt, 0.125, 0.5)
    assert t.flatten().tolist() == [0, 0, 1, 0, 1, 1]
    pos, verify = ru.annotation_percentages(unc, gt)
    assert pos == pytest.approx(100 / 6) and verify == pytest.approx(100 * 2 / 6)


def test_tau_b_only_matters_when_tau_u_is_below_its_distance_from_half():
    # a certain pixel has y <= 0.5 - tau_u or y >= 0.5 + tau_u: any tau_b within [0.5 - tau_u, 0.5 + tau_u]
    # binarises it the same way, so in the paper's grid only tau_u = 0.125 depends on tau_b
    p = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0))
    gt = (torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).to(torch.uint8)
    for tau_u in (0.25, 0.375):
        targets = [ru.partial_annotation(p, gt, tau_u, tau_b)[0] for tau_b in (0.25, 0.5, 0.75)]
        assert torch.equal(targets[0], targets[1]) and torch.equal(targets[1], targets[2])
    targets = [ru.partial_annotation(p, gt, 0.125, tau_b)[0] for tau_b in (0.25, 0.5, 0.75)]
    assert not torch.equal(targets[0], targets[1]) and not torch.equal(targets[1], targets[2])


# ---------------------------------------------------------------------------------------------------------
# The ResNet-18 encoder and torchvision's state-dict keys
# ---------------------------------------------------------------------------------------------------------
def torchvision_resnet18_state_dict(seed=0):
    """A state dict with torchvision's resnet18 keys and shapes (written out here from the architecture, not
    from our module): 20 convolutions, 20 BatchNorms (5 entries each), fc: 122 keys."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def bn(name, c):
        sd.update({f"{name}.weight": torch.rand(c, generator=g), f"{name}.bias": torch.randn(c, generator=g),
                   f"{name}.running_mean": torch.randn(c, generator=g),
                   f"{name}.running_var": torch.rand(c, generator=g) + 0.5,
                   f"{name}.num_batches_tracked": torch.tensor(7)})

    sd["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    bn("bn1", 64)
    c_in = 64
    for layer, c in enumerate([64, 128, 256, 512], 1):
        for block in range(2):
            pre = f"layer{layer}.{block}"
            sd[f"{pre}.conv1.weight"] = torch.randn(c, c_in if block == 0 else c, 3, 3, generator=g)
            bn(f"{pre}.bn1", c)
            sd[f"{pre}.conv2.weight"] = torch.randn(c, c, 3, 3, generator=g)
            bn(f"{pre}.bn2", c)
            if block == 0 and layer > 1:
                sd[f"{pre}.downsample.0.weight"] = torch.randn(c, c_in, 1, 1, generator=g)
                bn(f"{pre}.downsample.1", c)
        c_in = c
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512, generator=g), torch.randn(1000, generator=g)
    assert len(sd) == 122
    return sd


def test_resnet18_encoder_loads_torchvision_keys(tmp_path):
    sd = torchvision_resnet18_state_dict()
    model = unet.ResNetUNet(3, 1, 64)
    model.load_torchvision_resnet18(sd)
    enc = model.encoder.state_dict()
    assert set(enc) == {k for k in sd if not k.startswith("fc.")}
    for k, v in enc.items():
        assert torch.equal(v, sd[k]), k
    # through the script's --encoder-weights flag, from a file
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    args = ru.parse_args(["--encoder-weights", str(path), "--width", "64"])
    model = ru.build_model(args, torch.device("cpu")).eval()  # eval: layer4 is 1 x 1 at 32 x 32
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    assert torch.equal(model.encoder.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_resnet18_encoder_rejects_wrong_dicts(tmp_path):
    sd = torchvision_resnet18_state_dict()
    with pytest.raises(ValueError, match="shape mismatch"):
        unet.ResNetUNet(3, 1, 32).load_torchvision_resnet18(sd)
    del sd["layer3.1.conv2.weight"]
    with pytest.raises(ValueError, match="layer3.1.conv2.weight"):
        unet.ResNetUNet(3, 1, 64).load_torchvision_resnet18(sd)
    torch.save(sd, tmp_path / "bad.pth")
    cpu = torch.device("cpu")
    with pytest.raises(ru.common.UserError, match=r"--encoder-weights .*bad.pth: .*layer3.1.conv2.weight"):
        ru.build_model(ru.parse_args(["--width", "64", "--encoder-weights", str(tmp_path / "bad.pth")]), cpu)
    with pytest.raises(ru.common.UserError, match=r"--encoder-weights .*none.pth: file not found"):
        ru.build_model(ru.parse_args(["--width", "64", "--encoder-weights", str(tmp_path / "none.pth")]), cpu)
    with pytest.raises(ru.common.UserError, match="--width 64"):  # synthetic default width 16
        ru.parse_args(["--encoder-weights", str(tmp_path / "bad.pth")])


def test_resnet_unet_interface_for_common_helpers():
    import common
    model = unet.ResNetUNet(3, 1, 8, dropout=0.5, mean=ru.IMAGENET_MEAN, std=ru.IMAGENET_STD)
    assert model.dropout_at == "bottleneck" and model.feature_channels == 64
    model.eval()
    x = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    with torch.no_grad():
        feats = model.encode(x.float() / 255)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4, 2] and feats[-1].shape == (3, 64, 2, 2)
    assert common.pooled_features(model, x, np.arange(3), 2, torch.device("cpu")).shape == (3, 64)
    # MC dropout: encoder once + decoder T times gives a positive variance; BatchNorm stays in eval mode
    (_, mean, var), = list(common.mc_dropout(model, x, np.arange(3), 4, 3, torch.device("cpu")))
    assert mean.shape == (3, 64, 64) and float(var.sum()) > 0
    # ImageNet normalisation lives in the model: the same input gives the same output however it is called
    with torch.no_grad():
        assert torch.allclose(common.predict(model, x, np.arange(3), 3, torch.device("cpu")),
                              torch.sigmoid(model(x.float() / 255)[:, 0]), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Sec. IV-D augmentation on device batches
# ---------------------------------------------------------------------------------------------------------
def l_shapes(n=16, s=32):
    y = torch.zeros(n, s, s, dtype=torch.uint8)
    y[:, 6:26, 6:12] = 1   # an L: not symmetric under either flip or a rotation
    y[:, 20:26, 6:22] = 1
    return y


def test_flips_move_image_and_mask_together_exactly():
    torch.manual_seed(0)
    y = l_shapes()
    x = torch.rand(16, 3, 32, 32)
    aug = ru.make_augment(rotation=0, flip=1.0, jitter=0, blur_kernel=1)  # always both flips, nothing else
    xa, ya = aug(x, y)
    assert torch.allclose(xa, torch.flip(x, (2, 3)), atol=1e-5)
    assert torch.equal(ya, torch.flip(y, (1, 2)))


def test_augmentation_keeps_image_and_mask_aligned():
    torch.manual_seed(1)
    y = l_shapes(64)
    x = y[:, None].float().repeat(1, 3, 1, 1) * 0.9 + 0.05   # the image is the mask, drawn in grey
    xa, ya = ru.make_augment()(x, y)                          # the paper's full augmentation
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == y.dtype
    assert float(xa.min()) >= -1e-6 and float(xa.max()) <= 1 + 1e-6
    changed = (ya != y).flatten(1).any(1)
    assert int(changed.sum()) >= 60                            # geometry really changes the masks
    agree = ((xa.mean(1) > 0.5) == (ya > 0)).float().mean(dim=(1, 2))
    assert float(agree.min()) > 0.97                          # and the image moved with them (edges may differ)
    # the same draws with a mask that does not follow the image would disagree
    assert float(((xa.mean(1) > 0.5) == (y > 0)).float().mean()) < 0.95


# ---------------------------------------------------------------------------------------------------------
# Full baseline: the AL run's optimisation steps
# ---------------------------------------------------------------------------------------------------------
def test_al_steps_hand_computed():
    a = type("A", (), dict(epochs_initial=10, epochs=10, initial=128, query=32, batch_size=32, rounds=40))
    assert ru.al_steps(a) == 10 * sum(4 + r for r in range(41)) == 9840
    a.rounds = 36  # the paper's 8140 (Sec. V-A) is 37 training stages of this protocol
    assert ru.al_steps(a) == 8140
    b = type("B", (), dict(epochs_initial=1, epochs=2, initial=8, query=4, batch_size=8, rounds=2))
    assert ru.al_steps(b) == 1 * 1 + 2 * 2 + 2 * 2


# ---------------------------------------------------------------------------------------------------------
# End to end on tiny synthetic data
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ru_runs")
    r = {}
    r["partial"] = run_dir_from(run_script("region_uncertainty.py", *TINY, "--partial", "--out", out))
    env = dict(os.environ)
    os.environ["ALSEG_STOP_AFTER_ROUND"] = "1"
    try:
        stopped = run_script("region_uncertainty.py", *TINY, "--partial", "--out", out / "resumed", check=False)
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    r["stopped"] = [os.path.join(out / "resumed", d) for d in os.listdir(out / "resumed")][0]
    run_dir_from(run_script("region_uncertainty.py", "--resume", r["stopped"]))
    r["full"] = run_dir_from(run_script("region_uncertainty.py", *TINY, "--strategy", "full", "--epochs", 2,
                                        "--out", out))
    r["mc"] = run_dir_from(run_script("region_uncertainty.py", *TINY, "--strategy", "mc-dropout", "--out", out))
    r["out"] = out
    return r


def test_partial_run_end_to_end(runs):
    d = runs["partial"]
    check = subprocess.run([sys.executable, os.path.join(ROOT, "..", "shared", "tools", "check_run.py"),
                            os.path.join(ROOT, "region_uncertainty.py"), d], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    rows = read_csv(os.path.join(d, "rounds.csv"))
    assert [int(r["round"]) for r in rows] == [0, 1, 2] and [int(r["labeled"]) for r in rows] == [8, 12, 16]
    assert [int(r["pseudo"]) for r in rows] == [0, 4, 8]  # images whose target is part model
    assert float(rows[0]["pct_verify"]) == 100                 # the cold start is fully annotated
    for r in rows[1:]:
        assert 0 <= float(r["pct_positive"]) <= float(r["pct_verify"]) <= 100
        assert 0 <= float(r["val_dice"]) <= 1
    assert [int(r["steps"]) for r in rows] == [1, 1 + 2, 1 + 2 + 2]  # 8, 12, 16 images in batches of 8
    q = read_csv(os.path.join(d, "queried.csv"))
    assert {r["how"] for r in q} == {"oracle-initial", "oracle-partial"} and len(q) == 16
    scores = read_csv(os.path.join(d, "pool_scores.csv"))
    r1 = [s for s in scores if s["round"] == "1"]                # least confidence took the lowest sums
    chosen = [float(s["score"]) for s in r1 if s["selected"] == "1"]
    assert len(chosen) == 4 and max(chosen) <= min(float(s["score"]) for s in r1 if s["selected"] == "0")
    for f in ("panel.png", "annotation.png", "dice_curve.png", "learning_curve.png"):
        assert os.path.isfile(os.path.join(d, f))
    assert json.load(open(os.path.join(d, "config.json")))["args"]["partial"] is True


def test_resume_gives_the_uninterrupted_run(runs):
    a, b = runs["partial"], runs["stopped"]
    assert read_csv(os.path.join(a, "queried.csv")) == read_csv(os.path.join(b, "queried.csv"))
    keep = ["round", "labeled", "pseudo", "dice_mean", "val_dice", "pct_positive", "pct_verify", "target_dice", "steps"]
    ra = [{k: r[k] for k in keep} for r in read_csv(os.path.join(a, "rounds.csv"))]
    rb = [{k: r[k] for k in keep} for r in read_csv(os.path.join(b, "rounds.csv"))]
    assert ra == rb


def test_full_baseline_trains_the_al_step_count(runs):
    rows = read_csv(os.path.join(runs["full"], "rounds.csv"))
    assert len(rows) == 1 and int(rows[0]["labeled"]) == 40
    assert int(rows[0]["steps"]) == 1 + 2 * 2 + 2 * 2  # = its AL run's with --epochs 2: 1 epoch of 5 + 4 steps
    assert float(rows[0]["pct_verify"]) == 100


def test_mc_dropout_run_and_tables(runs, capsys):
    rows = read_csv(os.path.join(runs["mc"], "rounds.csv"))
    assert [int(r["labeled"]) for r in rows] == [8, 12, 16]
    ru.main(["--tables", str(runs["out"])])
    out = capsys.readouterr().out
    t1, t2 = out.split("Table II")
    assert "| synthetic | 8+4x2, 64px | mc-dropout | 1 | 16 |" in t1
    assert "| synthetic | 8+4x2, 64px | full | 1 | 40 |" in t1
    assert "least-confidence" not in t1                       # the partial run belongs to Table II only
    assert "| synthetic | 8+4x2, 64px | least-confidence | 0.25 | 0.5 | 2 |" in t2
    assert "| synthetic | 8+4x2, 64px | full dataset | - | - | 1 |" in t2
    with pytest.raises(ru.common.UserError, match="no finished region_uncertainty runs"):
        ru.main(["--tables", str(runs["out"] / "nothing-here")])
