"""region_uncertainty.py: the three image scores and their direction, the MC-dropout path of score_pool,
dropout only in the MC-dropout network, partial annotation and its two percentages, the ResNet-18 encoder
loading torchvision's keys, bilinear_up2 == F.interpolate, the augmentation keeping image and mask aligned,
the full baseline's step count, main() with known predictions (each rule's picks in queried.csv; --partial's
training targets keep the model's labels, unlabelled targets hold the sentinel), and the script end to end
(least confidence, --partial, --resume, full, MC dropout under --deterministic, --tables) on tiny synthetic
data."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import interface
import region_uncertainty as ru
import unet
from conftest import run_dir_from, run_script

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


def test_the_person_is_shown_the_pixels_the_oracle_labels(monkeypatch):
    """--oracle folder with --partial: the decide map handed to the person (white: yours to label) is the uncertain
    mask of partial_annotation (Step 2a), not its complement: p = 0.5 and 0.7 are within tau_u = 0.25 of 0.5."""
    p, asked = torch.tensor([[[0.5, 0.9], [0.1, 0.7]]]), []
    monkeypatch.setattr(ru.common, "predict", lambda *a, **k: p)
    monkeypatch.setattr(ru.oracle, "ask", lambda *a: asked.append(a[-1]))
    y = torch.zeros(1, 2, 2, dtype=torch.uint8)
    ru.annotate(None, 1, None, None, None, y, np.array([0]), True, ru.parse_args([]), torch.device("cpu"))
    assert asked[0].tolist() == [[[True, False], [False, True]]]
    assert asked[0].tolist() == ru.partial_annotation(p, y, 0.25, 0.5)[1].tolist()


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
    import ssl_coldstart  # its pooled_features reads the features of any model with features()
    model = unet.ResNetUNet(3, 1, 8, dropout=0.5, mean=ru.IMAGENET_MEAN, std=ru.IMAGENET_STD)
    assert model.dropout_at == "bottleneck" and model.feature_channels == 64
    model.eval()
    x = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    with torch.no_grad():
        feats = model.encode(x.float() / 255)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4, 2] and feats[-1].shape == (3, 64, 2, 2)
    assert ssl_coldstart.pooled_features(model, x, np.arange(3), 2, torch.device("cpu")).shape == (3, 64)
    # MC dropout: encoder once + decoder T times gives a positive variance; BatchNorm stays in eval mode (its
    # running statistics untouched: in train mode each pass would update them)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    (_, mean, var), = list(common.mc_dropout(model, x, np.arange(3), 4, 3, torch.device("cpu")))
    assert mean.shape == (3, 64, 64) and float(var.sum()) > 0
    assert stats and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
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


def test_rotation_stays_within_30_degrees():
    """Sec. IV-D: rotation by +-30 degrees (not +-30 radians). A thin horizontal bar through the centre, rotated
    alone (no flip, jitter or blur): the angle of its principal axis is within 30 degrees of horizontal in every
    image, and reaches past 15 degrees in some."""
    torch.manual_seed(2)
    y = torch.zeros(64, 64, 64, dtype=torch.uint8)
    y[:, 31:33, 4:60] = 1
    _, ya = ru.make_augment(rotation=30.0, flip=0.0, jitter=0, blur_kernel=1)(torch.rand(64, 3, 64, 64), y)
    angles = []
    for m in ya:
        r, c = torch.nonzero(m, as_tuple=True)
        cov = torch.cov(torch.stack([c.double(), r.double()]))
        angles.append(abs(math.degrees(0.5 * math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))))
    assert max(angles) <= 31 and max(angles) > 15, angles


def test_colour_jitter_brightens_and_darkens_by_up_to_20_percent():
    """Sec. IV-D: brightness, contrast and saturation jitter of 0.2, factors drawn in [0.8, 1.2]. A flat grey
    image is unchanged by contrast and saturation, so the output is 0.5 x the brightness factor: in [0.4, 0.6],
    below 0.45 for some images and above 0.55 for others (a one-sided factor would never darken)."""
    torch.manual_seed(3)
    x = torch.full((256, 3, 8, 8), 0.5)
    xa, _ = ru.make_augment(rotation=0, flip=0.0, jitter=0.2, blur_kernel=1)(x, torch.zeros(256, 8, 8))
    level = xa.mean((1, 2, 3))
    assert torch.allclose(xa, level.view(-1, 1, 1, 1).expand_as(xa), atol=1e-6)  # still flat and grey
    assert float(level.min()) >= 0.4 - 1e-6 and float(level.max()) <= 0.6 + 1e-6
    assert float(level.min()) < 0.45 and float(level.max()) > 0.55


class Stop(Exception):
    pass


def test_main_trains_with_sgd_and_the_augmentation(tmp_path, monkeypatch):
    """Sec. IV-D: SGD with the flags' lr, momentum and weight decay on every model parameter, and the augmentation
    on the training batches unless --no-augment (main stopped at its first training call)."""
    made, seen = [], []
    real_sgd = torch.optim.SGD

    def sgd(params, **kw):
        params = list(params)
        made.append((params, kw))
        return real_sgd(params, **kw)

    def train(model, opt, x, target, idx, epochs, batch_size, **kw):
        seen.append((model, opt, kw))
        raise Stop

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    monkeypatch.setattr(ru.common, "train_epochs", train)
    for flags, augmented in (([], True), (["--lr", "0.05", "--momentum", "0.5", "--weight-decay", "0.003",
                                           "--no-augment"], False)):
        with pytest.raises(Stop):
            ru.main(["--device", "cpu", *map(str, TINY), *flags, "--out", str(tmp_path)])
        (params, kw), (model, opt, train_kw) = made[-1], seen[-1]
        args = ru.parse_args([*map(str, TINY), *flags])
        assert kw == dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        assert (args.lr, args.momentum, args.weight_decay) == ((0.01, 0.9, 1e-4) if augmented else (0.05, 0.5, 0.003))
        assert [id(p) for p in params] == [id(p) for p in model.parameters()] and isinstance(opt, real_sgd)
        assert (train_kw["augment"] is not None) == augmented
        assert train_kw["loss_fn"] is ru.common.bce_dice_loss  # --loss default bce+dice


# ---------------------------------------------------------------------------------------------------------
# Full baseline: the AL run's optimisation steps
# ---------------------------------------------------------------------------------------------------------
def test_al_steps_hand_computed():
    a = type("A", (), dict(strategy="full", epochs_initial=10, epochs=10, initial=128, query=32, batch_size=32,
                           rounds=40))
    assert common.ceiling(a, 2594)[2] == 10 * sum(4 + r for r in range(41)) == 9840
    a.rounds = 36  # the paper's 8140 (Sec. V-A) is 37 training stages of this protocol
    assert common.ceiling(a, 2594)[2] == 8140
    b = type("B", (), dict(strategy="full", epochs_initial=1, epochs=2, initial=8, query=4, batch_size=8, rounds=2))
    assert common.ceiling(b, 100)[2] == 1 * 1 + 2 * 2 + 2 * 2


def test_full_baseline_trains_the_papers_8140_steps_on_isic2018():
    """Sec. V-A: "the same number of iterations as for 40 AL iterations was used: 8140". The isic2018 row's
    --strategy full trains 8140 steps (99 epochs of the 2594 images' 82 batches at batch 32, and 22 more),
    --full-steps 0 the AL run's 9840; other data the AL run's unless --full-steps is given."""
    paper = ru.parse_args(["--data", "isic2018", "--data-dir", "x", "--strategy", "full"])
    assert paper.full_steps == 8140 and common.ceiling(paper, 2594, steps=paper.full_steps) == (0, 100, 8140)
    ours = ru.parse_args(["--data", "isic2018", "--data-dir", "x", "--strategy", "full", "--full-steps", "0"])
    assert common.ceiling(ours, 2594, steps=ours.full_steps) == common.ceiling(ours, 2594) == (0, 120, 9840)
    syn = ru.parse_args(["--strategy", "full"])
    assert syn.full_steps == 0 and common.ceiling(syn, 300, steps=syn.full_steps) == common.ceiling(syn, 300)
    fifty = ru.parse_args(["--strategy", "full", "--full-steps", "50"])
    assert common.ceiling(fifty, 300, steps=fifty.full_steps) == (0, 3, 50)  # 19 batches
    with pytest.raises(common.UserError, match="--full-steps -5: expected at least 0"):
        ru.parse_args(["--strategy", "full", "--full-steps", "-5"])
    al = ru.parse_args(["--data", "isic2018", "--data-dir", "x"])  # an AL run: the flags' own schedule
    assert common.ceiling(al, 2594, steps=al.full_steps) == (40, 10, None)


def test_full_baseline_asks_train_for_the_al_runs_steps(tmp_path, monkeypatch):
    """Sec. V-A: the full baseline gets the AL run's optimisation steps. common.train_epochs is asked for exactly those
    steps (TINY with --epochs 2: 1 epoch of 8 images, then 2 epochs of 12 and of 16, batches of 8: 1 + 4 + 4)
    on the whole training pool, not for whole epochs of it (2 x 5 = 10 steps). rounds.csv's step count is
    computed beside the call, so test_full_baseline_trains_the_al_step_count alone would not see the difference.
    With --full-steps 7 (the isic2018 row's 8140, on tiny data), train is asked for 7."""
    calls = []

    def train(model, opt, x, target, idx, epochs, batch_size, **kw):  # training skipped
        calls.append((len(idx), kw.get("steps")))
        return [(e, 0.0, 0.0) for e in range(epochs)]

    monkeypatch.setattr(ru.common, "train_epochs", train)
    ru.main(["--device", "cpu", *map(str, TINY), "--epochs", "2", "--strategy", "full", "--out", str(tmp_path)])
    ru.main(["--device", "cpu", *map(str, TINY), "--strategy", "full", "--full-steps", "7", "--out", str(tmp_path)])
    assert calls == [(40, 1 + 2 * 2 + 2 * 2), (40, 7)]


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
    r["full"] = ru.main(["--device", "cpu", *map(str, TINY), "--strategy", "full", "--epochs", "2", "--out", str(out)])
    # --deterministic on the CPU path: torch raises on an op without a deterministic implementation (warn_only=False)
    r["mc"] = run_dir_from(run_script("region_uncertainty.py", *TINY, "--strategy", "mc-dropout", "--deterministic",
                                      "--out", out))
    r["out"] = out
    return r


def test_partial_run_end_to_end(runs):
    d = runs["partial"]
    interface.assert_interface("region_uncertainty.py", [d, runs["stopped"], runs["full"], runs["mc"]])
    rows = read_csv(os.path.join(d, "rounds.csv"))
    assert [int(r["round"]) for r in rows] == [0, 1, 2] and [int(r["labeled"]) for r in rows] == [8, 12, 16]
    assert [int(r["pseudo"]) for r in rows] == [0, 4, 8]  # images whose target is part model
    assert float(rows[0]["pct_verify"]) == 100                 # the cold start is fully annotated
    for r in rows[1:]:
        assert 0 <= float(r["pct_positive"]) <= float(r["pct_verify"]) <= 100
        assert 0 <= float(r["val_dice"]) <= 1
    assert [int(r["steps"]) for r in rows] == [1, 1 + 2, 1 + 2 + 2]  # 8, 12, 16 images in batches of 8
    q = read_csv(os.path.join(d, "queried.csv"))
    assert {r["how"] for r in q} == {"initial", "oracle-least-confidence-partial"} and len(q) == 16
    scores = read_csv(os.path.join(d, "pool_scores.csv"))
    assert {s["round"] for s in scores} == {"1", "2"} and len(scores) == 32 + 28  # every pool image, every round
    r1 = [s for s in scores if s["round"] == "1"]                # least confidence took the lowest sums
    chosen = [float(s["score"]) for s in r1 if s["picked"] == "oracle-least-confidence-partial"]
    assert len(chosen) == 4 and max(chosen) <= min(float(s["score"]) for s in r1 if s["picked"] == "")
    for f in ("panel.png", "annotation.png", "dice_curve.png", "learning_curve.png", "picks/round_0.png",
              "picks/round_1.png", "picks/round_2.png"):
        assert os.path.isfile(os.path.join(d, f)), f
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
    assert {r["how"] for r in read_csv(os.path.join(runs["full"], "queried.csv"))} == {"full"}


def test_mc_dropout_run_and_tables(runs, capsys):
    rows = read_csv(os.path.join(runs["mc"], "rounds.csv"))
    assert [int(r["labeled"]) for r in rows] == [8, 12, 16]
    config = json.load(open(os.path.join(runs["mc"], "config.json")))["args"]
    assert config["dropout"] == 0.5 and config["deterministic"] is True
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


# ---------------------------------------------------------------------------------------------------------
# Dropout only where MC dropout needs it; the MC-dropout path of score_pool
# ---------------------------------------------------------------------------------------------------------
def test_dropout_only_in_the_mc_dropout_network():
    cpu = torch.device("cpu")
    drops = lambda m: [mod.p for mod in m.modules() if isinstance(mod, nn.Dropout)]
    for strategy in ("least-confidence", "entropy", "random", "full"):  # the paper's network: no dropout
        args = ru.parse_args(["--strategy", strategy])
        assert args.dropout == 0 and drops(ru.build_model(args, cpu)) == []
    args = ru.parse_args(["--strategy", "mc-dropout"])
    assert args.dropout == 0.5 and drops(ru.build_model(args, cpu)) == [0.5]
    assert ru.parse_args(["--dropout", "0.2"]).dropout == 0.2  # by flag, for any strategy
    with pytest.raises(ru.common.UserError, match="mc-dropout needs --dropout > 0"):
        ru.parse_args(["--strategy", "mc-dropout", "--dropout", "0"])


class SharedDropout(nn.Module):
    """Image i (its first pixel holds i) gets the logit s_i * z at every pixel, z = dropout(1) with p = 0.5: one
    draw per pass for the whole batch, 0 or 2. Over N passes with a share q of z = 2, each pixel's standard
    deviation is |sigmoid(2 s_i) - 0.5| sqrt(q (1 - q)): the same q for every image of the batch."""

    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", torch.tensor(s))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        z = self.drop(torch.ones(1))
        s = self.s[(x[:, 0, 0, 0] * 255).round().long()]
        return (s * z).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])


def test_score_pool_mc_dropout_hand_case():
    s = [0.0, 0.5, -1.5, 1.0]
    x = torch.zeros(4, 3, 2, 3, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(4, dtype=torch.uint8)
    args = type("A", (), dict(strategy="mc-dropout", batch_size=4, amp=False, mc_passes=20))
    torch.manual_seed(0)
    scores = ru.score_pool(SharedDropout(s), x, np.arange(4), args, torch.device("cpu"))
    amp = np.abs(1 / (1 + np.exp(-2 * np.array(s))) - 0.5)        # |sigmoid(2 s) - 0.5|
    assert scores[3] > 0 and scores[0] == pytest.approx(0, abs=1e-6)  # 0 < q < 1; s = 0 never varies
    assert scores / scores[3] == pytest.approx(amp / amp[3], rel=1e-4)  # Eq. 3: sum of per-pixel std
    q = (scores[3] / 6 / amp[3]) ** 2                               # back out q: 6 pixels, q (1 - q) = (std/amp)^2
    assert 0 < q <= 0.25
    assert sorted(ru.query(np.arange(4), scores, 2, "mc-dropout")) == [2, 3]  # the highest: |s| = 1.5 and 1


def test_score_pool_mc_dropout_matches_n_plain_passes():
    """On the real network (encoder once, decoder N times): the summed std of N plain forwards with dropout on
    (two-pass, float64), under the same seed."""
    torch.manual_seed(0)
    model = unet.ResNetUNet(3, 1, 4, dropout=0.5, mean=ru.IMAGENET_MEAN, std=ru.IMAGENET_STD)
    x = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    args = type("A", (), dict(strategy="mc-dropout", batch_size=3, amp=False, mc_passes=6))
    torch.manual_seed(1)
    scores = ru.score_pool(model, x, np.arange(3), args, torch.device("cpu"))
    torch.manual_seed(1)
    ru.common.enable_mc_dropout(model)
    with torch.no_grad():
        p = torch.stack([torch.sigmoid(model(x.float() / 255))[:, 0] for _ in range(6)]).double()
    want = p.std(0, unbiased=False).flatten(1).sum(1).numpy()
    assert want.min() > 0 and scores == pytest.approx(want, rel=1e-3)


def test_bilinear_up2_is_f_interpolate():
    """unet.upsample2x's deterministic CUDA path (bilinear_up2) computes F.interpolate's bilinear x2, forward
    and backward."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    a = unet.bilinear_up2(x)
    b = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    g = torch.randn_like(a)
    assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# main() with known scores: the picks in queried.csv follow each rule; --partial keeps the model's labels
# ---------------------------------------------------------------------------------------------------------
N_DATA = 60                                              # TINY: 40 / 10 / 10 synthetic images, ids syn00000...
RANK = np.random.default_rng(123).permutation(N_DATA)    # a fixed permutation: the known uncertainty order


def fake_predict(probs):
    """common.predict_batches returning probs[data index] (N, H, W) instead of the model's prediction."""
    def predict_batches(model, x, idx, batch_size, device, amp=False, view=None):
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        for b in ru.common.batches(idx, batch_size):
            yield b, probs[b]
    return predict_batches


def fake_mc(std):
    """common.mc_dropout returning a per-image constant standard deviation std[data index]."""
    def mc_dropout(model, x, idx, T, batch_size, device, amp=False, **kw):
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        for b in ru.common.batches(idx, batch_size):
            yield b, torch.full((len(b), 64, 64), 0.5), (std[b] ** 2).view(-1, 1, 1).expand(-1, 64, 64)
    return mc_dropout


def recording_train(log):
    """common.train_epochs that first records what it is given: a copy of the whole target tensor and the indices."""
    real = ru.common.train_epochs

    def train(model, opt, x, target, idx, *a, **kw):
        log.append((target.clone(), np.asarray(idx).copy()))
        return real(model, opt, x, target, idx, *a, **kw)
    return train


def test_main_breaks_ties_with_the_runs_generator(tmp_path, monkeypatch):
    """Equal scores (a saturated cold-start model) are drawn in the order of the run's seeded generator, which
    drew the cold start before (Sec. IV-D), not taken in pool order (the lowest ids)."""
    monkeypatch.setattr(ru, "score_pool", lambda model, x, pool, args, device: np.ones(len(pool)))
    monkeypatch.setattr(ru.common, "train_epochs", lambda *a, **k: [])  # no training
    run = ru.main(["--device", "cpu", *map(str, TINY), "--rounds", "1", "--out", str(tmp_path)])
    train = [int(sid[3:]) for sid in json.load(open(os.path.join(run, "splits.json")))["train"]]
    rng = np.random.default_rng([0, 1])
    pool = np.setdiff1d(train, rng.choice(train, 8, replace=False))
    want = ru.common.top_k(pool, np.ones(len(pool)), 4, rng=rng)
    assert sorted(picks_by_round(run)[1]) == sorted(want.tolist()) != sorted(pool[:4].tolist())


def picks_by_round(run):
    q = read_csv(os.path.join(run, "queried.csv"))
    rounds = sorted({int(e["round"]) for e in q})
    return {r: [int(e["sample_id"][3:]) for e in q if int(e["round"]) == r] for r in rounds}


@pytest.mark.parametrize("strategy", ["least-confidence", "entropy", "mc-dropout"])
def test_main_queries_the_most_uncertain_of_known_scores(strategy, tmp_path, monkeypatch):
    """Image i predicts p_i = 0.05 + 0.3 RANK[i] / 60 at every pixel (MC dropout: std 0.01 (1 + RANK[i])). The
    most uncertain are the highest RANK for every rule: least confidence's LOWEST sum of |0.5 - p| (p < 0.5),
    the highest printed entropy -p log2 p (rising below 1/e), the highest std. Each round must query the 4 pool
    images of highest RANK, and pool_scores.csv must hold Eqs. 1-3 of the known maps."""
    rank = torch.as_tensor(RANK, dtype=torch.float32)
    p = (0.05 + 0.3 * rank / N_DATA).view(-1, 1, 1).expand(-1, 64, 64).contiguous()
    monkeypatch.setattr(ru.common, "predict_batches", fake_predict(p))
    monkeypatch.setattr(ru.common, "mc_dropout", fake_mc(0.01 * (1 + rank)))
    run = ru.main(["--device", "cpu", *map(str, TINY), "--strategy", strategy, "--out", str(tmp_path)])
    picks = picks_by_round(run)
    train = [int(sid[3:]) for sid in json.load(open(os.path.join(run, "splits.json")))["train"]]
    labelled = set(picks[0])
    assert len(picks[0]) == 8 and sorted(picks) == [0, 1, 2]
    for rnd in (1, 2):
        pool = [i for i in train if i not in labelled]
        want = sorted(pool, key=lambda i: -RANK[i])[:4]
        assert sorted(picks[rnd]) == sorted(want), (rnd, picks[rnd], want)
        labelled |= set(picks[rnd])
    hand = {"least-confidence": lambda i: 4096 * abs(0.5 - float(p[i, 0, 0])),
            "entropy": lambda i: -4096 * float(p[i, 0, 0]) * math.log2(float(p[i, 0, 0])),
            "mc-dropout": lambda i: 4096 * 0.01 * (1 + RANK[i])}[strategy]
    rows = read_csv(os.path.join(run, "pool_scores.csv"))
    assert len(rows) == 32 + 28
    for r in rows:
        i = int(r["sample_id"][3:])
        assert float(r["score"]) == pytest.approx(hand(i), rel=1e-4)
        assert (r["picked"] == f"oracle-{strategy}") == (i in picks[int(r["round"])])


def test_main_partial_targets_keep_the_model_labels(tmp_path, monkeypatch):
    """--partial with a known prediction map per image: what common.train is given each round is, for a
    partially annotated image, the ground truth on its uncertain pixels (|0.5 - p| < tau_u) and p > tau_b on
    the rest, NOT the ground truth there; for an oracle image the ground truth; for every image not (yet)
    labelled the UNLABELLED sentinel, never a copy of the ground truth."""
    p = torch.rand(N_DATA, 64, 64, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(ru.common, "predict_batches", fake_predict(p))
    log = []
    monkeypatch.setattr(ru.common, "train_epochs", recording_train(log))
    run = ru.main(["--device", "cpu", *map(str, TINY), "--partial", "--tau-u", "0.2", "--tau-b", "0.6",
                   "--out", str(tmp_path)])
    y = torch.as_tensor(ru.common.load_data("synthetic", None, 64, 3, 0, n=N_DATA, quiet=True).y)
    uncertain = (0.5 - p).abs() < 0.2
    partial_target = torch.where(uncertain, y > 0, p > 0.6).to(torch.uint8)
    picks = picks_by_round(run)
    assert len(log) == 3  # one training call per round
    model_differs = 0
    for rnd, (target, idx) in enumerate(log):
        labelled = sorted(sum((picks[r] for r in range(rnd + 1)), []))
        assert sorted(idx.tolist()) == labelled
        for i in range(N_DATA):
            if i in picks[0]:                                     # the cold start: the oracle's whole mask
                assert torch.equal(target[i], y[i]), i
            elif i in labelled:                                   # Sec. III-B: oracle where uncertain, model elsewhere
                assert torch.equal(target[i], partial_target[i]), i
                model_differs += int(((partial_target[i] != y[i]) & ~uncertain[i]).sum())
            else:                                                 # not labelled: the sentinel, not the ground truth
                assert bool((target[i] == ru.UNLABELLED).all()), i
    assert model_differs > 1000  # the model's labels really differ from the ground truth (the test has teeth)
    rows = read_csv(os.path.join(run, "rounds.csv"))
    for rnd in (1, 2):
        u = uncertain[picks[rnd]]
        assert float(rows[rnd]["pct_verify"]) == pytest.approx(100 * float(u.float().mean()), rel=1e-4)
        assert float(rows[rnd]["pct_positive"]) == pytest.approx(
            100 * float((u & (y[picks[rnd]] > 0)).float().mean()), rel=1e-4, abs=1e-6)
