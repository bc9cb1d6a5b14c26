"""The fast paths compute the same thing as the naive ones that benchmarks/speed.py times them against:
common.mc_dropout (encoder once with the skip halves computed once, batched, looped) vs T plain forwards,
common.train (device-resident uint8, batches gathered by index) vs a Dataset + DataLoader loop, and
ssl_coldstart.pooled_features (batched) vs one sample at a time. No timing here (the benchmark measures speed)."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import ssl_coldstart
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("speed", os.path.join(ROOT, "benchmarks", "speed.py"))
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

CPU = torch.device("cpu")
X = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
IDX = np.arange(6)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to other jobs on the cores (2 OpenMP threads on a loaded
    machine spin for seconds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(dropout, at="bottleneck", cls=UNet, **kw):
    """Width 4 at 32 px, prepared as the scripts do (common.prepare_model: its memory format, channels_last on CUDA only), BatchNorm statistics
    from real activations (eval-mode BN is then not ~identity, so folding it into the convolutions is really
    tested), logits spread around 0 so that dropout moves them."""
    torch.manual_seed(0)
    m = common.prepare_model(cls(3, 1, 4, dropout=dropout, dropout_at=at, **kw), CPU)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
        m.train()(X.float() / 255)
        m.head.weight.mul_(20)
    return m.eval()


def mc(m, T, seed=1, **kw):
    torch.manual_seed(seed)
    (_, mean, var), = list(common.mc_dropout(m, X, IDX, T, 6, CPU, **kw))
    return mean, var


def naive(m, T, seed=1):
    torch.manual_seed(seed)
    (_, mean, var), = list(speed.naive_mc_dropout(m, X, IDX, T, 6, CPU))
    return mean, var


@pytest.mark.parametrize("kw", [{}, {"up": "bilinear"}, {"batchnorm": False}, {"deep_supervision": (0, 2)}])
def test_mc_paths_identical_without_dropout(kw):
    m = make_model(0.0, **kw)  # p = 0: every pass is the plain forward
    with torch.no_grad():
        out = m(X.float() / 255)
    ref = torch.sigmoid((out[0] if isinstance(out, tuple) else out)[:, 0])
    n_mean, n_var = naive(m, 3)
    assert torch.allclose(n_mean, ref, atol=1e-6)
    for encoder_once in (True, False):
        for batched in (True, False):
            mean, var = mc(m, 3, encoder_once=encoder_once, batched=batched)
            # float rounding only: the split convolution and the folded BatchNorm sum in another order
            assert torch.allclose(mean, ref, atol=1e-5), (encoder_once, batched, (mean - ref).abs().max())
            assert var.max() < 1e-6
    assert ref.std() > 1e-3  # outputs vary from pixel to pixel far beyond the tolerance: a real comparison


def test_encoder_once_repeats_only_what_follows_the_dropout():
    """FLOPs counted by torch: T plain passes cost T forwards; the encoder-once path costs one forward for the
    first pass and, per further pass, the decoder minus the skip halves of the first decoder convolutions.
    Skip halves by hand: stage i reads the skip of c_i = 4 * 2^i channels at (32 / 2^i)^2 pixels into c_i
    outputs with 3x3 kernels: 2 * 6 images * c_i^2 * 9 * (32 / 2^i)^2 = 1,769,472 FLOPs for each of 4 stages."""
    m = make_model(0.5)

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    xf = X.float() / 255
    fwd, enc = flops(lambda: m(xf)), flops(lambda: m.encode(xf))
    skip = 4 * 2 * 6 * 16 * 9 * 1024
    assert skip == sum(2 * 6 * (4 * 2 ** i) ** 2 * 9 * (32 // 2 ** i) ** 2 for i in range(4)) == 7077888
    for batched in (False, True):
        assert flops(lambda: mc(m, 1, encoder_once=True, batched=batched)) == fwd
        assert flops(lambda: mc(m, 4, encoder_once=True, batched=batched)) == fwd + 3 * (fwd - enc - skip)
        assert flops(lambda: mc(m, 4, encoder_once=False, batched=batched)) == 4 * fwd
    # a U-Net whose decode() is overridden: encoder once, the whole decoder T times (no skip split)
    plain = make_model(0.5, cls=speed.PlainDecodeUNet)
    assert flops(lambda: mc(plain, 4)) == enc + 4 * (fwd - enc)


def test_mc_looped_paths_use_the_same_dropout_masks_as_plain_forwards():
    """p > 0, fixed seed: the looped paths draw the same dropout masks, in the same order, as T plain
    forwards, so mean and variance agree to float rounding."""
    for at, cls in (("bottleneck", UNet), ("bottleneck", speed.PlainDecodeUNet), ("every", UNet)):
        m = make_model(0.5, at, cls)
        n_mean, n_var = naive(m, 8)
        mean, var = mc(m, 8, batched=False)
        assert n_var.mean() > 1e-3  # dropout really was on
        assert torch.allclose(mean, n_mean, atol=1e-5) and torch.allclose(var, n_var, atol=1e-5), (at, cls)
        other_mean, _ = naive(m, 8, seed=2)
        assert (other_mean - n_mean).abs().max() > 1e-3  # a different seed gives different masks: not vacuous
        assert not m.training


@pytest.mark.parametrize("at", ["bottleneck", "every"])
def test_mc_batched_path_matches_in_distribution(at):
    """Batched passes draw the masks for all T passes at once (another order of random numbers): the same
    mean and variance within Monte Carlo error. Two independent T-sample means differ by about
    sqrt(2 var / T) per pixel."""
    m = make_model(0.5, at)
    T = 100
    n_mean, n_var = naive(m, T)
    mean, var = mc(m, T, batched=True)
    assert n_var.mean() > 1e-3
    assert (mean - n_mean).abs().mean() < 1.5 * torch.sqrt(2 * n_var.mean() / T)
    assert abs(var.mean() - n_var.mean()) < 0.1 * n_var.mean()


def test_train_matches_a_naive_loop_on_the_same_batches():
    """common.train on device-resident uint8 gathered by index vs Dataset + DataLoader (per-sample NumPy ->
    float) on the same batches in the same order, same initial weights, same seed for dropout: the same
    loss trajectory and the same weights."""
    data = common.make_synthetic(24, 32, 3, seed=0)
    idx = np.random.default_rng(0).permutation(24)[:20]  # 20 of 24, unsorted; batches of 8, 8 and 4
    epochs, bs = 3, 8

    def fresh():
        torch.manual_seed(0)
        m = common.prepare_model(UNet(3, 1, 4, dropout=0.2, dropout_at="every"), CPU)
        return m, torch.optim.Adam(m.parameters(), 1e-3)

    m1, opt1 = fresh()
    x, y = common.to_device(data, CPU)
    torch.manual_seed(5)
    ours = common.train(m1, opt1, x, y, idx, epochs, bs, device=CPU, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # replay common.train's batch order
    orders = [idx[torch.randperm(len(idx), generator=g).numpy()] for _ in range(epochs)]
    m2, opt2 = fresh()
    torch.manual_seed(5)
    plain = []
    for o in orders:
        loader = speed.naive_loader(data, idx, bs, order=[o[s: s + bs].tolist() for s in range(0, len(o), bs)])
        plain.append(speed.naive_train_epoch(m2, opt2, loader, CPU))
    assert np.allclose(ours, plain, rtol=1e-5, atol=1e-6), (ours, plain)
    assert abs(ours[0] - ours[-1]) > 1e-3  # the loss moved: a trajectory, not one repeated number
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-5)


@pytest.mark.parametrize("grid", [1, 2])
def test_pooled_features_batched_equals_per_sample(grid):
    m = make_model(0.2, "every")
    ours = ssl_coldstart.pooled_features(m, X, IDX, 4, CPU, grid=grid)
    ref = speed.naive_features(m, X, IDX, CPU, grid=grid)
    assert ours.shape == (6, 64 * grid * grid) and ours.device.type == "cpu"
    assert torch.allclose(ours, ref, atol=1e-5) and ref.std() > 0


def test_benchmark_runs_and_prints_every_comparison(capsys):
    speed.main(["--smoke", "--device", "cpu", "--mc-passes", "4"])
    out = capsys.readouterr().out
    for line in ("training epoch", "T full forwards", "ours (auto: encoder once, looped)", "ours, batched",
                 "pooled_features", "forward + backward", "cached uint8", "peak host memory"):
        assert line in out, line
    assert "0.635 GiB" in out  # 2600 x (3 x 256 x 256 + 256 x 256) bytes = 681,574,400 B


def test_mc_variance_accurate_on_a_confident_model():
    """Where the model is confident (p ~ 1, median pixel variance 1e-11 to 1e-8), every path of common.mc_dropout
    gives the variance of a two-pass float64 computation on the same T probability maps (same seed, same
    dropout masks): E[p^2] - E[p]^2 in float32 would return rounding noise there (image sums off by a factor
    ~400 on this model), scrambling CEAL's "lowest uncertainty" group."""
    T = 8
    xf = X.float() / 255
    for at in ("bottleneck", "every"):
        m = make_model(0.5, at)
        with torch.no_grad():
            m.head.weight.div_(20)   # logits ~ 9 +- a little: p ~ 1 - 1e-4, moved slightly by dropout
            m.head.bias.fill_(9.0)
        for batched in (True, False):
            common.enable_mc_dropout(m)  # the reference: the same masks (same seed, same batch shape), float64
            torch.manual_seed(1)
            with torch.inference_mode():
                if batched:  # mc_dropout's batched path runs the T passes as one forward of the batch repeated
                    p = torch.sigmoid(m(xf.repeat(T, 1, 1, 1)).float()[:, 0]).reshape(T, *xf.shape[:1], *xf.shape[2:])
                else:
                    p = torch.stack([torch.sigmoid(m(xf).float()[:, 0]) for _ in range(T)])
            p = p.double()
            ref = ((p - p.mean(0)) ** 2).mean(0)  # two passes
            assert 1e-13 < ref.median() < 1e-8 and ref.max() < 1e-4 and p.min() > 0.9  # confident indeed
            for encoder_once in ((True, False) if at == "bottleneck" else (False,)):
                mean, var = mc(m, T, encoder_once=encoder_once, batched=batched)
                assert torch.allclose(mean.double(), p.mean(0), atol=1e-6)
                assert (var.double() - ref).abs().max() < 1e-10, (at, batched, encoder_once)
                rel = (var.double().sum((1, 2)) / ref.sum((1, 2)) - 1).abs().max()
                assert rel < 1e-3, (at, batched, encoder_once, rel)
