"""Each script's defaults for its paper's dataset are the paper's protocol (../shared/PROTOCOLS.md, each number
cited in the script's DEFAULTS). The other tests override them for speed, so a wrong paper number would pass
them all; these read the flags as a user gets them (parse_args, no data needed) and the constants behind them."""
import inspect

import numpy as np
import pytest
import torch.nn as nn

import ceal_mcdropout as ceal
import common
import dsal_fingerbones as dsal
import polyp_weighted_cluster as pwc
import region_uncertainty as region
import ssl_coldstart as ssl


def flags(module, *argv):
    return vars(module.parse_args(list(argv)))


def has(got, **want):
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not wrong, f"(got, paper): {wrong}"


def test_ceal_isic2017_and_lgg():
    has(flags(ceal, "--data", "isic2017"), split=[1600, 400, 600], initial=600, query=35, rounds=10,
        epochs_initial=20, epochs=5, mc_passes=20, pseudo_step=20, dropout_at="every", strategy="ceal",
        width=64)  # Sec. 1.2: about 31 M parameters
    has(flags(ceal, "--data", "lgg"), split=[878, 220, 275], initial=329, query=35, all_slices=False, width=64)


def test_ceal_dropout_between_the_convolutions_of_every_block():
    """Sec. 1.2 (PROTOCOLS): dropout between the two convolutions of each of the 9 blocks (5 down, 4 up), at the
    script's --dropout; --dropout-at bottleneck (the public code) only after the lowest-resolution block."""
    model = ceal.UNet(3, 1, 8, dropout=0.2, dropout_at=flags(ceal, "--data", "isic2017")["dropout_at"])
    blocks = [*model.enc, *model.dec]
    assert len(blocks) == 9 and all(isinstance(b.drop, nn.Dropout) and b.drop.p == 0.2 for b in blocks)
    assert isinstance(model.bottleneck_drop, nn.Identity)
    model = ceal.UNet(3, 1, 8, dropout=0.5, dropout_at="bottleneck")
    assert not any(isinstance(b.drop, nn.Dropout) for b in [*model.enc, *model.dec])
    assert isinstance(model.bottleneck_drop, nn.Dropout) and model.bottleneck_drop.p == 0.5


@pytest.mark.parametrize("mode,rnd,pseudo", [("total", 3, 20), ("per-iteration", 3, 60)])
def test_ceal_splits_35_into_10_10_15_and_pseudo_labels_20_per_iteration(monkeypatch, mode, rnd, pseudo):
    """Sec. 4.2: 10 lowest + 10 highest + 15 from the band to the oracle; 20 pseudo-labels per iteration
    (--pseudo-mode total: 20 new each iteration; per-iteration: 20 x t at iteration t)."""
    seen = {}

    def groups(scores, n_low, n_high, n_band, n_pseudo, *a, **k):
        seen.update(n_low=n_low, n_high=n_high, n_band=n_band, n_pseudo=n_pseudo)
        raise StopIteration

    args = ceal.parse_args(["--data", "isic2017", "--pseudo-mode", mode])
    monkeypatch.setattr(ceal, "score_pool", lambda *a: (np.arange(100.0), None, np.full(100, np.nan)))
    monkeypatch.setattr(common, "ceal_groups", groups)
    with pytest.raises(StopIteration):
        ceal.ceal_query(None, rnd, None, None, None, np.arange(100), args, np.random.default_rng(0), "cpu")
    assert seen == dict(n_low=10, n_high=10, n_band=15, n_pseudo=pseudo)


def test_ssl_isic2017_and_models_genesis():
    has(flags(ssl, "--data", "isic2017"), split=[1600, 0, 400], initial=300, query=35, rounds=9, epochs_initial=10,
        epochs=2, image_size=256, channels=1, clusters=10, aap_grid=2, ssl_init=True, cold_start="cluster",
        shuffle_blocks=10000, width=32)  # width 32: the last encoder stage is 512 x 16 x 16 (Sec. IV-A)
    # the public 2D port of Models Genesis: flip 0.4 (up to 3 times), shuffle 0.5, Bezier 0.9, painting 0.9 of
    # which out-painting 0.8 and in-painting 0.2
    assert (ssl.FLIP_P, ssl.FLIP_TIMES, ssl.SHUFFLE_P, ssl.NONLINEAR_P, ssl.PAINT_P, ssl.OUTPAINT_P) == \
        (0.4, 3, 0.5, 0.9, 0.9, 0.8)
    assert inspect.signature(ssl.models_genesis).parameters["n_blocks"].default == 10000


def test_region_isic2018_and_augmentation():
    got = flags(region, "--data", "isic2018")
    has(got, split=[2594, 100, 1000], image_size=512, batch_size=32, initial=128, query=32, rounds=40,
        epochs=10, lr=0.01, momentum=0.9, weight_decay=1e-4, entropy="printed", no_augment=False, partial=False,
        width=64)  # ResNet-18: 64 ... 512 channels
    has(flags(region, "--data", "isic2018", "--partial"), rounds=20, tau_u=0.25, tau_b=0.5)
    aug = inspect.signature(region.make_augment).parameters
    assert {k: p.default for k, p in aug.items()} == dict(rotation=30.0, flip=0.5, jitter=0.2, blur_sigma=(0.01, 0.2),
                                                          blur_kernel=5)
    assert (region.IMAGENET_MEAN, region.IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_polyp_cvc_clinicdb():
    has(flags(pwc, "--data", "cvc-clinicdb"), split=[550, 0, 62], image_size=352, batch_size=16, lr=1e-4, epochs=5,
        rounds=5, query=30, initial=30, delta=0.2, lam=0.1, strategy="ours", width=64)


def test_dsal_heads_weights_and_rule():
    """Heads after decoder stages 0 and 1 (0 = lowest resolution: the authors' Keras layers 20 and 23), weights
    0.1 / 0.3 / 0.6 (lower / middle / final: the paper's order, not the later code's final-first list), the
    paper's rule (highest agreement), and the 209 -> 139 / 20 / 50 split."""
    has(flags(dsal, "--data", "folder", "--data-dir", "."), ds_stages=[0, 1], ds_weights=[0.1, 0.3, 0.6],
        select="highest", strategy="dsal", loss="ce")
    assert dsal.paper_split(209) == [139, 20, 50]
