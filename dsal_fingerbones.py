"""Deeply Supervised Active Learning for Finger Bones Segmentation (Zhao, Yang, Veeravalli, Zeng; EMBC 2020;
papers/dsal_fingerbones.md).

A U-Net with deep supervision (extra classifiers on a lower and a middle decoder layer, upsampled to full
size) scores each unlabelled image by how well its hidden heads agree with its final mask: the mean of
L-DSC = Dice(lower, final) and M-DSC = Dice(middle, final); the images with the largest mean go to the oracle.

  python dsal_fingerbones.py                           # synthetic finger bones, CPU, about 2 minutes
  python dsal_fingerbones.py --data folder --data-dir ~/data/fingerbones   # the paper's protocol (GPU)
  python dsal_fingerbones.py --tables runs/            # Fig. 4: test Dice vs annotations, from finished runs

The paper's baseline is --strategy random (also --select lowest, --strategy full).
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
import oracle
from unet import UNet

# Defaults per dataset. The paper's numbers for its hand radiographs (Sec. III-IV), read through `--data
# folder` (the finger-bone masks are not public); the authors' later public code (DSAL, JBHI 2021,
# github.com/jacobzhaoziyuan/DSAL, src/constants.py and src/unet.py) where the paper is silent.
DEFAULTS = {
    "folder": dict(split=None,              # Sec. IV-A: 209 images (11 x 19 age groups) -> 139 / 20 / 50 (paper_split)
                   initial=None, query=None,  # Sec. IV-A: 10 random images first, then the top 10 per step
                   rounds=None,             # paper silent (Sec. IV-A: +10 per step): until the 139 are used up
                   epochs_initial=50,       # paper silent; later code 15 (for 600 initial ISIC images, batch 32):
                   epochs=10,               # 10 labelled images need more epochs; 10 per step as in the later code
                   batch_size=8,            # paper silent; later code 32 (at 192x240)
                   lr=1e-4,                 # paper silent; later code Adam 1e-5 (BCE on the RSNA radiographs,
                                            # constants.py); departure: 1e-4 with CE here (our choice)
                   width=32,                # paper: "the basic architecture of U-Net"; later code's U-Net is 32..512
                   image_size=608,          # Sec. IV-A: 600x600; 608 is the nearest size 4 poolings divide. The
                                            # crop before it is the user's (a non-square image is stretched)
                   normalise="minmax"),     # Sec. IV-A: "intensity normalization" (method not given; see normalise())
    # CPU-sized protocol on thin, elongated synthetic bones (make_fingerbones): about two minutes on 2 cores.
    # Same shape as the paper's: 10 initial, +10 per step until the training pool is used up. 128x128 at
    # width 8 costs about what 64x64 at width 16 does, and keeps the bones wider than a pixel at the lower
    # head's 1/8 resolution (at 64x64 its masks are blobs and L-DSC says little).
    "synthetic": dict(split=[90, 20, 100], initial=10, query=10, rounds=8, epochs_initial=40, epochs=10,
                      batch_size=8, lr=1e-3, width=8, image_size=128, normalise="minmax"),
    # Any other dataset: the folder protocol at 256x256; split sizes from the data (common.default_split),
    # the initial set and the step size the paper's shares of the pool (10 and 10 of 139: common.pool_share),
    # steps until the training pool is used up.
    "other": dict(split=None, initial=None, query=None, rounds=None, epochs_initial=50, epochs=10, batch_size=8,
                  lr=1e-4, width=32, image_size=256, normalise="none"),
}
DEPTH = 4  # unet.UNet default: 5 encoder stages, 4 decoder stages (0 = lowest resolution)


def parse_args(argv=None):
    p = common.shared_parser(__doc__, ["dsal", "random", "full"], DEFAULTS)
    # DSAL flags
    p.add_argument("--select", default="highest", choices=["highest", "lowest"],
                   help="query the largest mean head agreement (Sec. III-B, default) or the lowest (the authors' "
                        "later code, DS_ASCEND=True)")
    p.add_argument("--ds-stages", type=int, nargs=2, default=[0, 1], metavar=("LOWER", "MIDDLE"),
                   help="decoder stages (0 = lowest resolution, 3 = full) of the lower and the middle head; "
                        "Sec. III-A's 20th and 23rd layers are stages 0 and 1 (default: 0 1; later code: 2 1)")
    p.add_argument("--ds-weights", type=float, nargs=3, default=[0.1, 0.3, 0.6], metavar=("A_L", "A_M", "A_F"),
                   help="Eq. 2 weights of the lower, middle and final classifiers (Sec. III-A: 0.1 0.3 0.6)")
    p.add_argument("--loss", default="ce", choices=["ce", "ce+dice"],
                   help="per-head loss: cross-entropy (Eq. 1, default) or cross-entropy + soft Dice")
    p.add_argument("--normalise", choices=["minmax", "histeq", "none"],
                   help="per-image intensity normalisation (Sec. IV-A; see normalise()); default per --data: "
                        + ", ".join(f"{d} {r['normalise']}" for d, r in DEFAULTS.items()))
    p.add_argument("--tables", nargs="+", metavar="RUN_DIR",
                   help="build the Fig. 4 table and figure from finished runs (folders or their parents) and exit")
    p.add_argument("--reach-tolerance", type=float, default=0.01, metavar="DICE",
                   help="--tables: a method 'reaches the full-annotation Dice' (Sec. IV-B: 'comparable results') "
                        "at the first labelled count whose mean test Dice is at least the full-annotation mean minus "
                        "this (paper silent; default 0.01, one Dice point)")
    args = common.resolve(p.parse_args(argv), DEFAULTS, reach_tolerance=0)
    lo, mid = args.ds_stages
    if lo == mid or not all(0 <= s < DEPTH for s in (lo, mid)):
        raise common.UserError(f"--ds-stages {lo} {mid}: expected two different decoder stages in 0..{DEPTH - 1}")
    if min(args.ds_weights) < 0 or sum(args.ds_weights) <= 0:
        raise common.UserError(f"--ds-weights {args.ds_weights}: expected three non-negative weights, not all zero")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: synthetic finger bones, and the radiographs' intensity normalisation
# ----------------------------------------------------------------------------------------------------------
def _segment_distance(px, py, a, b):
    """Distance of every pixel centre (px, py) to the segment a-b (normalised coordinates)."""
    d = b - a
    t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    return np.hypot(px - a[0] - t * d[0], py - a[1] - t * d[1])


def _blur(img, sigma):
    """Separable Gaussian blur with reflected borders (numpy only)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    for axis in (0, 1):
        p = np.pad(img, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        img = sum(w * np.take(p, np.arange(j, j + img.shape[axis]), axis=axis) for j, w in enumerate(k))
    return img


# Finger rays: angle from the hand axis, metacarpal length, phalanx lengths (thumb: two phalanges).
RAYS = [(-0.75, 0.17, (0.13, 0.10)), (-0.22, 0.27, (0.17, 0.11, 0.08)), (-0.06, 0.26, (0.19, 0.12, 0.08)),
        (0.10, 0.25, (0.18, 0.11, 0.08)), (0.26, 0.22, (0.14, 0.09, 0.07))]


def make_fingerbones(n, size=64, seed=0):
    """Hand-radiograph-like images whose masks are thin, elongated bones: per hand, five rays of a metacarpal
    and two or three phalanges (capsules separated by joint spaces, brighter at the cortex) inside soft
    tissue. Sampled like the paper's set, one-year age groups in turn (i % 19): younger hands have thinner
    bones and wider joint spaces. Varied pose, spread, exposure (gain, gamma, background), blur and noise,
    so that intensity normalisation matters; hard cases: ~25 % low bone contrast, bright clutter (a side
    marker "L" in half the images, a ring on a finger in ~15 %), overlapping fingers, hands cut by the
    border, and ~8 % near-duplicates
    (a shifted, re-noised copy of an earlier image). Deterministic from the seed. Returns a common.Data
    with grayscale images (N, 1, S, S) uint8 and masks (N, S, S) in {0, 1}."""
    rng = np.random.default_rng([seed, 0xB0E])
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
    xs = np.zeros((n, 1, size, size), np.uint8)
    ys = np.zeros((n, size, size), np.uint8)
    cover = lambda d, r: np.clip((r - d) * size + 0.5, 0, 1)  # anti-aliased coverage of a shape
    kinds = []
    for i in range(n):
        if i > 10 and rng.random() < 0.08:  # near-duplicate of an earlier image
            j = int(rng.integers(0, i))
            dy, dx = rng.integers(-2, 3, 2)
            img = np.roll(xs[j, 0] / 255.0, (dy, dx), (0, 1)) + rng.normal(0, 0.02, (size, size))
            xs[i, 0] = np.clip(img * 255, 0, 255).astype(np.uint8)
            ys[i] = np.roll(ys[j], (dy, dx), (0, 1))
            kinds.append("duplicate")
            continue
        maturity = ((i % 19) + rng.random()) / 19  # age group 0-1 ... 18-19 years
        theta = -np.pi / 2 + rng.normal(0, 0.18)   # the hand points up
        axis = np.array([np.cos(theta), np.sin(theta)])
        perp = np.array([-axis[1], axis[0]])
        scale = rng.uniform(0.8, 1.1)
        wrist = np.array([0.5 + rng.normal(0, 0.05), 0.97 + rng.normal(0, 0.03)])
        r_bone = scale * rng.uniform(0.014, 0.022) * (0.8 + 0.3 * maturity)
        gap = scale * (0.010 + 0.022 * (1 - maturity))  # joint spaces: wider in young children
        spread = rng.uniform(0.6, 1.3)
        kind = "low-contrast" if rng.random() < 0.25 else "normal"
        bones, fingers, proximal_mid = [], [], []
        for k, (ang, metacarpal, phalanges) in enumerate(RAYS):
            a = theta + spread * ang + rng.normal(0, 0.04)
            base = wrist + axis * (0.22 if k else 0.16) * scale + perp * ((k - 2) * 0.055 - 0.04 * (k == 0)) * scale
            p, direction = base, np.array([np.cos(a), np.sin(a)])
            r = r_bone * (1.25 if k == 0 else 1.0)
            for j, length in enumerate((metacarpal,) + phalanges):
                q = p + direction * length * scale * rng.uniform(0.92, 1.08)
                bones.append((p + direction * gap / 2, q - direction * gap / 2, r * (1 - 0.12 * j)))
                if j == 1:
                    proximal_mid.append((p + q) / 2)
                p = q
                bend = a + rng.normal(0, 0.05)
                direction = np.array([np.cos(bend), np.sin(bend)])
            fingers.append((base, p, r_bone * 2.4))
        tissue = np.zeros((size, size))
        for a_, b_, r_ in fingers + [(wrist + axis * 0.05 * scale, wrist + axis * 0.30 * scale, 0.16 * scale),
                                     (wrist, wrist + np.array([0, 0.6]), 0.11 * scale)]:  # palm, forearm
            tissue = np.maximum(tissue, cover(_segment_distance(xx, yy, a_, b_), r_))
        bone = np.zeros((size, size))
        mask = np.zeros((size, size), bool)
        for a_, b_, r_ in bones:
            d = _segment_distance(xx, yy, a_, b_)
            mask |= d < r_
            bone = np.maximum(bone, cover(d, r_) * (0.75 + 0.25 * np.clip(d / r_, 0, 1) ** 2))  # bright cortex
        c_bone = rng.uniform(0.04, 0.08) if kind == "low-contrast" else rng.uniform(0.1, 0.35)
        light = 1 + 0.2 * (xx - 0.5) * rng.normal() + 0.2 * (yy - 0.5) * rng.normal()
        img = rng.uniform(0.0, 0.2) + rng.uniform(0.15, 0.35) * tissue * light + \
            c_bone * bone * (1 + 0.15 * rng.normal(size=(size, size)).clip(-2, 2))
        if rng.random() < 0.15:  # a ring on a finger: bright metal, not bone
            cx, cy = proximal_mid[int(rng.integers(1, 5))]
            d = np.hypot(xx - cx, yy - cy)
            img = img + 0.5 * cover(np.abs(d - 2.3 * r_bone), 0.4 * r_bone)
        if rng.random() < 0.5:  # the side marker: a bright "L" near a corner, as bright as bone
            if rng.random() < 0.5:  # a right hand: mirror the hand, not the letter
                img, mask = img[:, ::-1], mask[:, ::-1]
            pil = Image.new("L", (size, size))
            cx, cy, h = rng.uniform(0.05, 0.2) * size, rng.uniform(0.05, 0.2) * size, rng.uniform(0.06, 0.1) * size
            ImageDraw.Draw(pil).line([cx, cy, cx, cy + h, cx + 0.6 * h, cy + h], fill=255, width=max(1, size // 40))
            img = img + c_bone * 1.2 * np.asarray(pil, np.float64) / 255
        img = np.clip(_blur(img, rng.uniform(0.3, 0.9) * size / 64), 0, 1) ** rng.uniform(0.6, 1.6)  # blur, gamma
        img = img * rng.uniform(0.5, 1.0) + rng.normal(0, rng.uniform(0.02, 0.06), img.shape)       # exposure, noise
        xs[i, 0] = np.clip(img * 255, 0, 255).astype(np.uint8)
        ys[i] = mask
        kinds.append(kind)
    data = common.Data(xs, ys, [f"hand{i:04d}" for i in range(n)], {}, None, "synthetic")
    data.kinds = kinds
    return data


def normalise(x, how):
    """Sec. IV-A: "intensity normalization to improve the brightness and sharpness of bones" (method not given).
    Per image, on uint8 (N, C, H, W) already resized to --image-size (departure: the paper normalises first, then
    crops and resizes; docs):
    - minmax (default): (x - min) / (max - min) x 255, the linear contrast stretch (Gonzalez & Woods, Digital
      Image Processing, 3rd ed., Sec. 3.2.4); it evens out the exposure of radiographs taken on different
      machines (paper Fig. 2) without amplifying noise;
    - histeq: global histogram equalisation (Gonzalez & Woods, Sec. 3.3.1: s = (L - 1) CDF(r)), with the CDF
      shifted so that the darkest grey level maps to 0. For hand radiographs it "has been the most frequently
      adopted image contrast enhancement technique" (BioMedical Engineering OnLine 12:27, 2013,
      doi:10.1186/1475-925X-12-27), which also reports that it over-enhances; on the synthetic images it
      turns the noisy background into bright speckle, which is why it is not the default;
    - none."""
    if how == "none":
        return x
    flat = x.reshape(len(x), -1)
    out = np.empty_like(flat)
    for i, f in enumerate(flat):
        lo, hi = int(f.min()), int(f.max())
        if hi == lo:  # a constant image stays as it is
            out[i] = f
        elif how == "minmax":
            out[i] = np.round((f.astype(np.float64) - lo) * 255 / (hi - lo))
        elif how == "histeq":
            cdf = np.cumsum(np.bincount(f, minlength=256))
            lut = np.round((cdf - cdf[lo]) / (cdf[-1] - cdf[lo]) * 255)
            out[i] = lut[f]
        else:
            raise ValueError(f"normalise: unknown method {how!r}")
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------
# The method: deeply supervised U-Net (Sec. III-A), head agreement (Sec. III-B), Fig. 3's rank correlation
# ----------------------------------------------------------------------------------------------------------
def build_model(in_ch, args):
    """U-Net with auxiliary 1x1 classifiers on two decoder stages, upsampled to full size (unet.UNet). Sec.
    III-A places them on "the twentieth and twenty-third layers, namely lower layer and middle layer". In
    the authors' Keras U-Net (32..512 channels; the later code's src/unet.py get_unet, adopted from the CEAL
    code), model.layers[20] is the upsampled output of decoder stage 0 and model.layers[23] the output of
    decoder stage 1 (counting from 1: the last convolution of stage 0 and the first of stage 1): lower =
    stage 0 (1/8 resolution), middle = stage 1 (1/4). The later JBHI code moved them to stages 1 (weight
    0.3) and 2 (weight 0.1, its "L-DSC"): --ds-stages 2 1. Dropout 0.5 after the bottleneck while training, as
    theirs (Dropout(0.5) on conv5; off when the pool is scored: get_unet_ds(dropout=False)) and the U-Net of
    Ronneberger et al. ("drop-out layers at the end of the contracting path"). Departures from that Keras U-Net
    (paper silent: "the basic architecture of U-Net"), unet.UNet's in every script: BatchNorm after every
    convolution (theirs has none; the pool is scored with its running statistics), transposed-convolution
    upsampling and PyTorch's default initialisation (theirs: he_normal)."""
    return UNet(in_ch, 1, args.width, DEPTH, dropout=0.5, dropout_at="bottleneck",
                deep_supervision=sorted(args.ds_stages))


def heads(out, stages):
    """(lower, middle, final) logits from the model's (final, [aux by increasing stage]) output."""
    final, aux = out
    by_stage = dict(zip(sorted(stages), aux))
    return by_stage[stages[0]], by_stage[stages[1]], final


def ds_loss(out, target, stages, weights, dice=False):
    """Eq. 2: L = a_l L_l + a_m L_m + a_f L_f, each L_c the cross-entropy of Eq. 1 averaged over pixels (one
    logit: BCE == two-class cross-entropy, see common.bce_dice_loss); with dice=True each L_c adds soft Dice."""
    total = 0.0
    for alpha, z in zip(weights, heads(out, stages)):
        loss_c = common.bce_dice_loss(z, target) if dice else \
            F.binary_cross_entropy_with_logits(z.float().squeeze(1), target.float())
        total = total + alpha * loss_c
    return total


def select(pool, score, k, rule, rng=None):
    """Sec. III-B: "the images with larger mean of L-DSC and M-DSC will be selected" (rule "highest"); the
    authors' later code sorts ascending and takes the first (rule "lowest"). Exact ties (common: the score is a
    mean of two Dice values of binary masks, often exactly 1 or 0) in an order drawn from rng, the run's seeded
    generator; without rng, in pool order."""
    return common.top_k(pool, score, k, largest=rule == "highest", rng=rng)


def rank_average(a):
    """Ranks 1..n, ties given the mean of the ranks they span (numpy only)."""
    a = np.asarray(a, dtype=np.float64)
    ranks = np.empty(len(a))
    ranks[np.argsort(a, kind="stable")] = np.arange(1, len(a) + 1)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks; nan when either is constant or
    holds a nan (R-DSC of a pool without masks)."""
    if np.isnan(np.asarray(x, float)).any() or np.isnan(np.asarray(y, float)).any():
        return float("nan")
    rx, ry = rank_average(x), rank_average(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


@torch.inference_mode()
def score_pool(model, x, y, pool, args, device):
    """Sec. III-B: binarise the lower, middle and final heads (p > 0.5), L-DSC = Dice(lower, final) and M-DSC
    = Dice(middle, final) (Eq. 3), score = their mean (common.head_agreement). Also R-DSC, the final mask's
    Dice against the hidden ground truth, for Fig. 3 only: it never selects (nan where y is None: the pool has
    no masks, common.pool_truth)."""
    out = {k: [] for k in ("score", "l_dsc", "m_dsc", "r_dsc")}
    for b, o in common.forward_batches(model, x, pool, args.batch_size, device, args.amp):
        lower, middle, final = (z[:, 0].float() > 0 for z in heads(o, args.ds_stages))
        score, l_dsc, m_dsc = common.head_agreement(lower, middle, final)
        r_dsc = common.dice_iou(final, y[b] > 0)[0] if y is not None else torch.full_like(score, np.nan)
        for k, v in zip(out, (score, l_dsc, m_dsc, r_dsc)):
            out[k].append(v.cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# The active-learning loop
# ----------------------------------------------------------------------------------------------------------
def paper_split(n):
    """Sec. IV-A: 209 radiographs -> 139 train / 20 validation / 50 test; a folder of another size gets the
    same shares. With the initial set and the step (10 and 10 of the 139: common.pool_share) and the steps
    until the pool is used up, the paper's numbers follow exactly from a folder of 209 images."""
    val, test = common.pool_share(n, 20, 209), common.pool_share(n, 50, 209)
    return [n - val - test, val, test]


def split_and_steps(run, data, args):
    """The seeded split (a folder: paper_split's shares, Sec. IV-A), the initial set and the step size
    (common.split_data), the step count until the training pool is used up, and the check of --initial and
    --query; all recorded in config.json. Returns the train, validation and test indices."""
    # Sec. IV-A: 10 random images, then +10 per step, of the 139 training images (the same shares elsewhere)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 10, 10, 139,
                                                     split=paper_split(len(data)) if args.data == "folder" else None)
    if not 1 <= args.initial <= len(train_ids) or args.query < 1:
        raise common.UserError(f"--initial {args.initial} / --query {args.query}: need 1 <= --initial <= the "
                               f"training pool ({len(train_ids)}) and --query >= 1")
    if args.rounds is None:  # steps until the training pool is used up
        args.rounds = math.ceil((len(train_ids) - args.initial) / args.query)
    run.update_config(args)  # and the step count
    return train_ids, val_ids, test_ids


def query(run, rnd, model, data, x, y, pool, args, device, rng):
    """One selection step (Sec. III-B): score the pool with the model of the previous step, query args.query
    images (dsal: by the mean head agreement, select(); random: at random), and log the pool's scores, the
    picks and Fig. 3's numbers of the step (R-DSC against each proxy). Returns (the picks, the name they are
    logged under, the Fig. 3 numbers)."""
    s = score_pool(model, x, y, pool, args, device)  # every strategy: Fig. 3 is about the model
    # Fig. 3, departure: Spearman rho over the whole pool at each step (the paper: 10 random samples a step,
    # one regression on the orders of all steps). Paper silent on which epoch's model scores the pool: the
    # last here (the later code keeps the epoch of best training Dice, ModelCheckpoint(save_best_only=True))
    if args.strategy == "dsal":
        new = select(pool, s["score"], args.query, args.select, rng)
    else:
        new = common.query_random(pool, args.query, rng)
    how = f"oracle-{args.strategy}" + (f"-{args.select}" if args.strategy == "dsal" else "")
    chosen = np.isin(pool, new)
    fig3 = {"pool_scored": len(pool), "rho_l_dsc": spearman(s["r_dsc"], s["l_dsc"]),
            "rho_m_dsc": spearman(s["r_dsc"], s["m_dsc"]), "rho_mean": spearman(s["r_dsc"], s["score"]),
            "pool_dice": float(s["r_dsc"].mean()), "queried_dice": float(s["r_dsc"][chosen].mean()),
            "queried_score": float(s["score"][chosen].mean())}
    # the rule's score (mean) with its two terms, and R-DSC for Fig. 3 (it never selects)
    run.log_pool_scores(rnd, [data.ids[i] for i in pool], {"mean": s["score"], "l_dsc": s["l_dsc"],
                                                           "m_dsc": s["m_dsc"], "r_dsc": s["r_dsc"]},
                        {how: [data.ids[i] for i in new]})
    # picks/round_<rnd>.png, with the model that scored the pool (before this step's training)
    common.save_picks(run, rnd, model, data, x, {how: new}, dict(zip(pool.tolist(), s["score"])),
                      args.batch_size, device, args.amp)
    return new, how, fig3


def summary(run, n_train):
    """summary.json's own entries: the optimiser steps, the labelled fraction of the training set of n_train, the
    mean Spearman rho of each proxy over the steps (Fig. 3), and the paper's numbers beside them."""
    rows = run.read_csv("rounds.csv")
    rho = {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in ("rho_l_dsc", "rho_m_dsc", "rho_mean")}
    return {
        "steps": int(rows[-1]["steps"]),
        "training_set": n_train, "fraction_labeled": int(rows[-1]["labeled"]) / n_train,
        "mean_rho": {k: float(np.nanmean(v)) if len(v) and not np.isnan(v).all() else None for k, v in rho.items()},
        "paper": {"annotations_for_full_dice": 60, "fraction_for_full_dice": 0.4316,  # Fig. 4, Sec. IV-B
                  "fig3_rank_regression_coefficients": {"l_dsc": 0.80, "m_dsc": 0.73, "mean": 0.80}}}  # Fig. 3


def main(argv=None):
    args = parse_args(argv)
    if args.tables:
        return tables(args)
    run, device = common.Run.start(__file__, args, parse_args)

    # ---- data: folder layout (or synthetic) -> uint8 cache -> intensity normalisation -> seeded split ----
    in_ch = 1 if args.data in ("folder", "synthetic") else 3  # the radiographs are grayscale
    n = sum(args.split) if args.split else None
    data = make_fingerbones(n or 160, args.image_size, args.seed) if args.data == "synthetic" else \
        common.load_data(args.data, args.data_dir, args.image_size, in_ch, args.seed, n=n, workers=args.workers)
    data.x = normalise(data.x, args.normalise)
    train_ids, val_ids, test_ids = split_and_steps(run, data, args)
    # --strategy full (paper silent on how it trains): the whole training set for the AL run's optimiser steps
    # (whole epochs, then one partial epoch on a random subset), as region_uncertainty.py's paper does (Sec. V-A)
    rounds, epochs0, steps = common.ceiling(args, len(train_ids))
    x, y = common.to_device(data, device)

    # ---- model, optimiser, sets ----
    model = common.prepare_model(build_model(in_ch, args), device, args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = lambda out, t: ds_loss(out, t, args.ds_stages, args.ds_weights, args.loss == "ce+dice")
    rng = np.random.default_rng([args.seed, 1])  # initial set and random queries
    gen = torch.Generator().manual_seed(args.seed)  # batch order
    n0 = len(train_ids) if args.strategy == "full" else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)
    pool = np.setdiff1d(train_ids, labeled)
    steps_done = 0  # optimiser steps so far
    start, state = run.resume(model, opt, rng, gen)
    oracle.restore(run, start, data, y)  # --oracle folder: the person's labels of the finished rounds
    if state:
        labeled, pool, steps_done = state["labeled"], state["pool"], state["steps"]
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, scored=args.strategy == "dsal"))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        # ---- selection (Sec. III-B): score the pool with the model of the previous step ----
        t0, queried, fig3 = time.time(), {}, {}
        if rnd > 0:
            new, how, fig3 = query(run, rnd, model, data, x, common.pool_truth(data, y), pool, args, device, rng)
            queried[how] = [data.ids[i] for i in new]
            labeled, pool = np.concatenate([labeled, new]), np.setdiff1d(pool, new)
        else:  # the initial labelled set (random, Sec. IV-A), or the whole training set for --strategy full
            how = "full" if args.strategy == "full" else "initial"
            queried[how] = [data.ids[i] for i in labeled]
            common.save_picks(run, rnd, model, data, x, {how: labeled}, None, args.batch_size, device, args.amp)
        select_s = time.time() - t0
        oracle.ask(run, rnd, new if rnd > 0 else labeled, data, y, model, x, args.batch_size, device, args.amp)
        t0 = time.time()

        # ---- training: fine-tune the same model on all labelled images (Sec. III) ----
        epochs = epochs0 if rnd == 0 else args.epochs

        for e, loss, _ in common.train_epochs(model, opt, x, y, labeled, epochs, args.batch_size, device=device,
                                              amp=args.amp, loss_fn=loss_fn, generator=gen, steps=steps):
            progress.epoch(rnd, e, epochs, loss)
        steps_done += steps or epochs * math.ceil(len(labeled) / args.batch_size)
        train_s = time.time() - t0

        # ---- evaluation on the test set (final head); the round is written before anything else ----
        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        val = common.evaluate(model, x, y, val_ids, args.batch_size, device, args.amp)[0]
        row = common.round_row(rnd, len(labeled), 0, dice, iou, train_s, select_s, val_dice=common.mean_std(val)[0],
                               pool_left=len(pool), steps=steps_done)
        row.update({k: fig3.get(k) for k in ("pool_scored", "rho_l_dsc", "rho_m_dsc", "rho_mean", "pool_dice",
                                              "queried_dice", "queried_score")})
        rows = run.end_round(row, queried, progress, model, opt, rng, gen, labeled=labeled, pool=pool,
                             steps=steps_done)
        if fig3:
            figures(run, rows)

    oracle.predict_rest(run, model, data, x, np.setdiff1d(train_ids, labeled), args.batch_size, device, args.amp)
    panel(run, model, data, x, pool if len(pool) else test_ids, args, device)
    return run.finish(summary(run, len(train_ids)))


# ----------------------------------------------------------------------------------------------------------
# Figures: Fig. 3 (proxy vs real Dice of the pool, per step), the panel, and Fig. 4 (--tables)
# ----------------------------------------------------------------------------------------------------------
PROXIES = (("l_dsc", "L-DSC"), ("m_dsc", "M-DSC"), ("mean", "mean"))


def figures(run, rows):
    """Fig. 3, left: each pool sample's real Dice (R-DSC) against L-DSC, M-DSC and their mean, every step so far;
    right: their orders within each step (descending, 1 = best); and the rank correlation per step."""
    scores = run.read_csv("pool_scores.csv")
    rnd = np.array([int(r["round"]) for r in scores])
    col = lambda k: np.array([float(r[k]) for r in scores])
    real = col("r_dsc")
    if np.isnan(real).all():  # the pool has no masks (common.pool_truth): no Fig. 3
        return
    last = rows[-1]
    rho = ", ".join(f"{label} {float(last['rho_' + k]):.2f}" for k, label in PROXIES)
    common.plot(run.path("fig3_scatter.png"), {label: (real, col(k)) for k, label in PROXIES},
                "real Dice of the pool sample (R-DSC)", "head agreement", f"all steps; step {last['round']}: rho {rho}",
                kind="scatter")
    order = lambda v: np.concatenate([rank_average(-v[rnd == r]) for r in np.unique(rnd)])
    common.plot(run.path("fig3_ranks.png"), {label: (order(real), order(col(k))) for k, label in PROXIES},
                "order of R-DSC within its step", "order of the proxy", "Fig. 3 right: descending orders",
                kind="scatter")
    done = [k for k, r in enumerate(rows) if k > 0 and r.get("rho_mean") not in (None, "")]
    xs = [int(rows[k - 1]["labeled"]) for k in done]  # the labelled count of the model that scored the pool
    common.plot(run.path("fig3_rho.png"), {label: (xs, [float(rows[j]["rho_" + k]) for j in done])
                                           for k, label in PROXIES},
                "labelled images of the scoring model", "Spearman rho with R-DSC", "rank correlation per step")


@torch.inference_mode()
def panel(run, model, data, x, ids, args, device, n=4):
    """Image / ground truth / final mask / lower and middle heads / their disagreement with the final mask."""
    ids = np.asarray(ids)[:n]
    if not len(ids):  # no test set (--oracle folder, every image unlabelled): no panel
        return
    outs = [heads(out, args.ds_stages)
            for _, out in common.forward_batches(model, x, ids, args.batch_size, device, args.amp)]
    lower, middle, final = ((torch.cat(z)[:, 0].float() > 0).float().cpu().numpy() for z in zip(*outs))
    disagreement = (np.abs(lower - final) + np.abs(middle - final)) / 2
    rows = [[data.x[i], data.y[i], final[j], lower[j], middle[j], disagreement[j]] for j, i in enumerate(ids)]
    common.save_panel(run.path("panel.png"), rows, 6, ["image", "ground truth", "final", "lower head", "middle head",
                                                       "disagreement"])


def tables(args):
    """Fig. 4: test Dice against the number of annotations per method (mean ± std over seeds), and the fraction
    of the training set at which each method first reaches the full-annotation Dice (paper: 60 of 139,
    43.16 %, "comparable results"): the first labelled count whose mean Dice is at least the full-annotation
    mean minus --reach-tolerance. Built only from common.collect_runs / one_schedule / summarise / markdown_table /
    plot; trains nothing."""
    for p in args.tables:
        if not os.path.exists(p):
            raise common.UserError(f"--tables {p}: no such folder; expected run folders (or their parents)")
    rows = [r for r in common.collect_runs(args.tables) if r["script"] == "dsal_fingerbones" and r["finished"]]
    if not rows:
        raise common.UserError(f"--tables {' '.join(args.tables)}: no finished dsal_fingerbones runs found "
                               f"(expected folders with config.json and rounds.csv)")
    for r in rows:
        r["method"] = f"dsal-{r['select']}" if r["strategy"] == "dsal" else r["strategy"]
        r["training_set"] = r["split"][0] if r.get("split") else None
    for data in sorted({(r["data"], r["training_set"]) for r in rows}, key=repr):  # one schedule per curve
        common.one_schedule([r for r in rows if (r["data"], r["training_set"]) == data], data[0])
    curve = common.summarise(rows, ("data", "training_set", "method", "labeled"), ("dice_mean", "rho_mean"))
    full = {(r["data"], r["training_set"]): r for r in curve if r["method"] == "full"}
    reach = []
    for key in sorted({(r["data"], r["training_set"], r["method"]) for r in curve if r["method"] != "full"}):
        c = sorted((r for r in curve if (r["data"], r["training_set"], r["method"]) == key), key=lambda r: r["labeled"])
        f = full.get(key[:2])
        hit = next((r for r in c if f is not None and r["dice_mean"] >= f["dice_mean"] - args.reach_tolerance), None)
        reach.append({"data": key[0], "method": key[2], "n": c[0]["n"],
                      "full_dice": f["dice_mean"] if f else "no full run",
                      "first_reached_at": int(hit["labeled"]) if hit else "not reached",
                      "fraction": f"{hit['labeled'] / key[1]:.2%}" if hit and key[1] else "-",
                      "best_dice": max(r["dice_mean"] for r in c)})
    text = ("## Test Dice against annotations (paper Fig. 4)\n\n" +
            common.markdown_table(curve, ["data", "method", "labeled", "n", "dice_mean", "rho_mean"],
                                  ["data", "method", "labelled", "runs", "test Dice", "Spearman rho (mean score)"]) +
            f"\n\n## First reaching the full-annotation Dice, within {args.reach_tolerance:g} (--reach-tolerance; "
            f"paper: 60 annotations, 43.16 % of 139, 'comparable results')\n\n" +
            common.markdown_table(reach, ["data", "method", "n", "full_dice", "first_reached_at", "fraction",
                                          "best_dice"],
                                  ["data", "method", "runs", "full-annotation Dice", "labelled",
                                   "fraction of training set", "best Dice"]) + "\n")
    out = common.out_folder(os.path.join(args.out, "dsal_fingerbones_tables"), "fig4.md and its figures")
    with open(os.path.join(out, "fig4.md"), "w") as fh:
        fh.write(text)
    series, several = {}, len({(r["data"], r["training_set"]) for r in curve}) > 1
    for r in curve:
        name = f"{r['data']}:{r['training_set']} {r['method']}" if several else r["method"]
        for lst, v in zip(series.setdefault(name, ([], [], [])), (r["labeled"], r["dice_mean"], r["dice_mean_std"])):
            lst.append(v)
    xmin = min(r["labeled"] for r in curve)
    for name in [k for k in series if k.endswith("full")]:  # the full-annotation Dice as a horizontal line
        n_full, d, sd = series[name]
        series[name] = ([xmin, n_full[0]], [d[0]] * 2, [sd[0]] * 2)
    common.plot(os.path.join(out, "fig4_curve.png"), series, "annotated images", "test Dice",
                "Fig. 4: DS-U-Net query vs random")
    print(text)
    print(f"done: Fig. 4 from {len({r['run'] for r in rows})} runs; {out}")
    return out


if __name__ == "__main__":
    common.run_main(main)
