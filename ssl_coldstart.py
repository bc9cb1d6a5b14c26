"""Self-supervised Assisted Active Learning for Skin Lesion Segmentation (Zhao, Lu et al., EMBC 2022;
papers/ssl_coldstart.md).

The cold-start set is chosen without labels: a U-Net is pre-trained on the unlabelled pool by restoring
Models Genesis corruptions (Eq. 1), its last-encoder features are pooled and clustered with K-means (Eq. 2),
and each cluster gives N_Ci = ceil(C x N_i / N) samples, nearest its centroid first; the segmentation model
starts from the self-supervised weights (all but the output head, as the authors' code) and every iteration
continues the cluster ranking. Every round writes pool_scores.csv and picks/round_K.png.

  python ssl_coldstart.py                                              # synthetic data, CPU, about 2.5 minutes
  python ssl_coldstart.py --data isic2017 --data-dir ~/data/isic2017   # the paper's protocol (GPU)
  python ssl_coldstart.py --tables runs/                               # Table I / II from finished runs
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import oracle
from unet import UNet

# Defaults per dataset. The paper's numbers for ISIC 2017 (Sec. IV-A); where it is silent, say so. Paper silent,
# so ours (the authors' code, github.com/jacobzhaoziyuan/SAAL, differs): the pool and test set drawn at random
# with --seed (theirs: the first 1600 files and the last 400); Eq. 3's L_ce + L_dice as BCE + a soft Dice per
# image (theirs: 0.5 (CE + Dice) on two softmax classes, Dice over the batch); the MC-dropout comparator's plain
# variance sum (the DSAL code weighs it by a distance transform of the prediction).
DEFAULTS = {
    "isic2017": dict(split=[1600, 0, 400],  # Sec. IV-A: pool 1600 + test 400, both from the 2000 training images
                     initial=300,           # Sec. IV-A: C = 300 for the base set
                     query=35,              # Sec. IV-A: +35 labelled samples per iteration
                     rounds=9,              # Sec. IV-A: T = 9 iterations
                     epochs_initial=10, epochs=2,  # Sec. IV-A: 10 initial epochs, 2 per iteration
                     batch_size=10,         # paper silent: the authors' run.sh, batch_size=10
                     lr=1e-4,               # paper silent: the authors' run.sh, Adam 1e-4 (a new one each round)
                     width=32,              # Sec. IV-A: last encoder stage 512x16x16 at 256^2. Departure: width
                                            # 32 gives it here; the authors' code: width 64, bottleneck halved to
                                            # 512, bilinear upsampling (--up; docs)
                     image_size=256,        # Sec. IV-A: 256x256, grayscale, min-max normalised
                     clusters=10,           # Sec. IV-A: k = 10 (Table II also 5)
                     aap_grid=2,            # Sec. IV-A: AAP to 512x2x2 = 2048-d (Table II also 1x1 = 512-d)
                     ssl_epochs=100,        # paper silent: Models Genesis trains to convergence; 100 epochs here
                     shuffle_blocks=10000,  # Models Genesis reference code: 10,000 blocks
                     mc_passes=20,          # paper silent (Fig. 2 comparator): CEAL reference code 20
                     pseudo_step=20,        # CEAL Sec. 4.2: 20 x iteration pseudo-labels in all; DSAL JBHI code: 20
                                            # more per iteration from iteration 5 (Fig. 2 comparators)
                     ensemble_size=4),      # paper silent: the public Suggestive Annotation re-implementation, M = 4
    # CPU-sized protocol, about 2.5 minutes on 2 cores (docs/ssl_coldstart.md): C = 40 of a pool of 300 (the
    # paper: 300 of 1600), +10 x 9 iterations, epochs 50 / 10 (the paper's 10 / 2 ratio; 40 images make only
    # 3 steps an epoch, and with 20 / 4 the model was still far from fitted: test Dice swung between rounds).
    # shuffle_blocks: 10,000 windows cover a 2-D image ~30 times over (the reference code's 3-D cubes ~2
    # times); 1,000 (~3 times) keeps the CPU row fast.
    "synthetic": dict(split=[300, 0, 100], initial=40, query=10, rounds=9, epochs_initial=50, epochs=10,
                      batch_size=16, lr=1e-3, width=16, image_size=64, clusters=10, aap_grid=2, ssl_epochs=6,
                      shuffle_blocks=1000, mc_passes=10, pseudo_step=5, ensemble_size=4),
    # Any other dataset: the ISIC protocol; split from the data (common.default_split), C, the query size and
    # the CEAL / DSAL comparators' pseudo-label step the ISIC shares of the pool (300, 35 and 20 of 1600:
    # common.pool_share).
    "other": dict(split=None, initial=None, query=None, rounds=9, epochs_initial=10, epochs=2, batch_size=10,
                  lr=1e-4, width=32, image_size=256, clusters=10, aap_grid=2, ssl_epochs=100,
                  shuffle_blocks=10000, mc_passes=20, pseudo_step=None, ensemble_size=4),
}
STRATEGIES = ["cluster", "random", "mc-dropout", "ceal", "ens-s", "ens-js", "suggestive", "dsal", "full"]

# Models Genesis transform probabilities (the public 2D port of the reference code; PROTOCOLS.md).
FLIP_P, FLIP_TIMES = 0.4, 3           # flip, repeated while rand < 0.4, at most 3 times
SHUFFLE_P = 0.5                       # local pixel shuffling
NONLINEAR_P, BEZIER_POINTS = 0.9, 1000  # Bezier intensity mapping (reference code samples the curve 100,000x)
PAINT_P, OUTPAINT_P = 0.9, 0.8        # painting; out-painting 0.8, in-painting 0.2
SAVE_EVERY_S = 60  # ssl_pretrain.pt after the first epoch, then once this many seconds have passed (GPU epochs: ~4 s)

# The paper's test Dice on ISIC 2017, beside ours in summary.json and in the tables command.
PAPER_TABLE_I_COLS = ["random, w/o SSL", "random, w/ SSL", "cluster k=10 AAP 2048, w/o SSL",
                      "cluster k=10 AAP 2048, w/ SSL"]
PAPER_TABLE_I = {  # Table I: labelled -> the four columns above
    300: (0.580, 0.682, 0.744, 0.732), 370: (0.657, 0.576, 0.683, 0.682), 440: (0.717, 0.696, 0.743, 0.763),
    510: (0.687, 0.725, 0.765, 0.777), 580: (0.774, 0.785, 0.797, 0.803)}
PAPER_TABLE_II_COLS = ["random", "cluster k=5 AAP 512", "cluster k=5 AAP 2048", "cluster k=10 AAP 512",
                       "cluster k=10 AAP 2048"]
PAPER_TABLE_II = {  # Table II (segmentation without SSL weights): iteration (0 = base) -> the five columns above
    0: (0.580, 0.714, 0.734, 0.739, 0.744), 1: (0.614, 0.676, 0.673, 0.667, 0.647),
    2: (0.657, 0.663, 0.690, 0.682, 0.683), 3: (0.645, 0.723, 0.720, 0.699, 0.716),
    4: (0.717, 0.737, 0.719, 0.736, 0.743), 5: (0.708, 0.749, 0.753, 0.741, 0.750),
    6: (0.687, 0.772, 0.767, 0.741, 0.765), 7: (0.763, 0.762, 0.762, 0.747, 0.767),
    8: (0.774, 0.786, 0.784, 0.779, 0.797), 9: (0.766, 0.793, 0.793, 0.776, 0.800)}


def parse_args(argv=None):
    p = common.shared_parser(__doc__, STRATEGIES, DEFAULTS)
    # Self-supervised cold-start flags
    p.add_argument("--cold-start", default="auto", choices=["auto", "cluster", "random"],
                   help="how the base set of C = --initial samples is chosen; auto: cluster for --strategy cluster, "
                        "random for the others (paper silent on the comparators' base set) (default: auto)")
    p.add_argument("--ssl-init", action=argparse.BooleanOptionalAction, default=True,
                   help="initialise the segmentation model from the self-supervised weights, all but the output "
                        "head unless --transfer-head (Sec. III-C; Table I 'W/'), for every strategy, the Fig. 2 "
                        "comparators too (paper silent); --no-ssl-init for 'W/o' (default: on)")
    p.add_argument("--ssl-weights", metavar="PATH", help="pre-trained weights (ssl_weights.pt of an earlier run) "
                   "instead of pre-training here, so a sweep pre-trains once per seed (default: pre-train)")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3],
                   help="input channels: 1 = grayscale (Sec. IV-A: the paper's ISIC protocol), 3 = RGB (for colour "
                        "data; the reconstruction target is then the RGB image) (default: 1)")
    p.add_argument("--transfer-head", action=argparse.BooleanOptionalAction, default=False,
                   help="with --ssl-init, also copy the reconstruction U-Net's 1x1 output head (trained to output "
                        "intensities); the authors' segmentation code drops it (default: off, head starts random)")
    p.add_argument("--up", default="transpose", choices=["transpose", "bilinear"],
                   help="U-Net upsampling: transposed convolutions, or bilinear + 1x1 convolution (the authors' "
                        "U-Net upsamples bilinearly, align_corners, with no 1x1: its double convolution takes all the "
                        "channels) (paper silent; default: transpose)")
    p.add_argument("--ssl-epochs", type=int, help="Models Genesis pre-training epochs; default per --data: "
                   "isic2017 and other 100, synthetic 6 (paper silent)")
    p.add_argument("--ssl-optim", default="adam", choices=["adam", "sgd"],
                   help="pre-training optimiser: adam (ours: Adam, --ssl-lr 1e-3, batch --batch-size) or sgd (the "
                        "authors' code: SGD momentum 0.9, lr 0.01, batch 1, lr halved every 40 epochs; their early "
                        "stopping is left out) (default: adam)")
    p.add_argument("--ssl-lr", type=float, help="pre-training learning rate (paper silent; default 1e-3 with adam, "
                   "0.01 with sgd)")
    p.add_argument("--ssl-batch-size", type=int, help="pre-training batch (paper silent; default --batch-size with "
                   "adam, 1 with sgd)")
    p.add_argument("--shuffle-blocks", type=int, help="local pixel shuffling: blocks per image (Models Genesis "
                   "reference code: 10000; default per --data: isic2017 and other 10000, synthetic 1000; 0 turns "
                   "it off; at most 100000)")
    p.add_argument("--clusters", type=int, help="k of K-means (Sec. IV-A: 10; Table II: 5 or 10; default 10)")
    p.add_argument("--aap-grid", type=int, choices=[1, 2], help="adaptive average pooling of the last encoder "
                   "stage to grid x grid: 2 -> 512x2x2 = 2048-d at width 32 (Sec. IV-A), 1 -> 512-d (Table II) "
                   "(default 2)")
    p.add_argument("--mc-passes", type=int, help="mc-dropout / ceal: T stochastic passes (paper silent; CEAL "
                   "reference code 20; default per --data: isic2017 and other 20, synthetic 10)")
    p.add_argument("--pseudo-step", type=int, help="ceal: step new pseudo-labels per iteration, step x iteration "
                   "in all (CEAL Sec. 4.2: 20; ceal_mcdropout.py's default --pseudo-mode total); dsal: see "
                   "--dsal-pseudo-from; default per --data: isic2017 20, synthetic 5, other the ISIC share of the "
                   "pool, 20 of 1600)")
    p.add_argument("--dropout", type=float, help="bottleneck dropout (paper silent; default 0.5 for mc-dropout "
                   "and ceal as in the public CEAL code, else 0)")
    p.add_argument("--ensemble-size", type=int, help="ens-s / ens-js / suggestive: M models on bootstrap resamples, "
                   "each from its own random initialisation (paper silent; the public Suggestive Annotation "
                   "re-implementation uses 4; default 4)")
    p.add_argument("--dsal-select", default="lowest", choices=["lowest", "highest"],
                   help="dsal: query the lowest mean head agreement (DSAL, JBHI 2021 [5], the paper's Fig. 2 "
                        "comparator) or the highest (the earlier EMBC 2020 text) (default: lowest)")
    p.add_argument("--dsal-pseudo-from", type=int, default=5,
                   help="dsal: pseudo-label from this iteration on (JBHI code: pseudo_epoch 5; 0 = never) "
                        "(default: 5)")
    p.add_argument("--tables", nargs="+", metavar="RUN_DIR", help="print Table I / II (and the Fig. 2 "
                   "comparison) from finished run folders, write them to OUT/ssl_coldstart_tables.md, and exit")
    args = common.resolve(p.parse_args(argv), DEFAULTS, ssl_epochs=0, ssl_batch_size=1, shuffle_blocks=0, clusters=1,
                          ensemble_size=2, dsal_pseudo_from=0)
    if args.cold_start == "auto":
        args.cold_start = "cluster" if args.strategy == "cluster" else "random"
    if args.dropout is None:
        args.dropout = 0.5 if args.strategy in ("mc-dropout", "ceal") else 0.0
    common.check_mc_dropout(args, "mc-dropout", "ceal")
    if args.ssl_lr is None:
        args.ssl_lr = 0.01 if args.ssl_optim == "sgd" else 1e-3
    if not args.ssl_lr > 0:
        raise common.UserError(f"--ssl-lr {args.ssl_lr}: expected a learning rate above 0")
    if args.ssl_batch_size is None:
        args.ssl_batch_size = 1 if args.ssl_optim == "sgd" else args.batch_size
    if args.shuffle_blocks > 100000:  # its draws grow with it: 10^8 took all 24 GB of a machine, and the kernel's kill
        raise common.UserError(f"--shuffle-blocks {args.shuffle_blocks}: expected at most 100000 (10 times the "
                               "reference code's 10000: a typo?)")
    if args.transfer_head and args.channels != 1:
        raise common.UserError("--transfer-head with --channels 3: the reconstruction head outputs 3 channels, "
                               "the segmentation head 1; it cannot be copied")
    return args


# ----------------------------------------------------------------------------------------------------------
# Sec. III-A: Models Genesis corruptions D(.) of Eq. 1, on device batches (B, C, H, W) in [0, 1]
# ----------------------------------------------------------------------------------------------------------
def _rand(shape, gen, device):
    return torch.rand(shape, generator=gen, device=device)


def _randint(lo, hi, shape, gen, device):
    """Integers in [lo, hi], both included (Python's random.randint), lo and hi ints or tensors."""
    lo = torch.as_tensor(lo, device=device)
    hi = torch.as_tensor(hi, device=device)
    return torch.minimum(lo + (_rand(shape, gen, device) * (hi - lo + 1)).long(), hi)


def _boxes(H, W, y0, x0, h, w):
    """(B, K, H, W) bool: pixel inside box k of image b (top-left y0, x0; size h x w)."""
    r = torch.arange(H, device=y0.device).view(1, 1, H, 1)
    c = torch.arange(W, device=y0.device).view(1, 1, 1, W)
    e = lambda t: t[..., None, None]
    return (r >= e(y0)) & (r < e(y0 + h)) & (c >= e(x0)) & (c < e(x0 + w))


def flip(x, gen, p=FLIP_P, times=FLIP_TIMES):
    """Flip along an axis drawn among three, repeated while rand < p, at most `times` times: the reference
    code's data_augmentation, np.flip(x, axis=random.choice([0, 1, 2])) on one image of shape (1, rows, cols)
    in the 2-D port, (1, rows, cols, deps) in the 3-D code (generate_pair). Axis 0 is the single channel: one
    draw in three flips nothing, kept as the reference does it. The axis the 2-D variant drops (PROTOCOLS.md)
    is depth, which the 3-D code never flips either. Only the parity of flips per axis matters."""
    B, dev = len(x), x.device
    go = (_rand((B, times), gen, dev) < p).int().cumprod(1).bool()  # the loop stops at the first failed draw
    axis = torch.randint(0, 3, (B, times), generator=gen, device=dev)  # 0: the channel, 1: rows (H), 2: cols (W)
    odd = lambda a: ((go & (axis == a)).sum(1) % 2 == 1).view(B, 1, 1, 1)
    x = torch.where(odd(1), x.flip(-2), x)
    return torch.where(odd(2), x.flip(-1), x)


def local_pixel_shuffling(x, gen, p=SHUFFLE_P, n_blocks=10000):
    """With probability p per image: n_blocks windows of random size up to H/10 x W/10 at random places, the
    pixels of each window permuted at random (shuffle_windows). n_blocks=0 (--shuffle-blocks 0) turns it off."""
    B, C, H, W = x.shape
    dev = x.device
    sel = torch.nonzero(_rand(B, gen, dev) < p)[:, 0]
    out = x.clone()
    if len(sel) == 0 or n_blocks == 0:
        return out
    n, mh, mw = len(sel), max(1, H // 10), max(1, W // 10)
    bh, bw = _randint(1, mh, (n, n_blocks), gen, dev), _randint(1, mw, (n, n_blocks), gen, dev)
    y0, x0 = _randint(0, H - bh, (n, n_blocks), gen, dev), _randint(0, W - bw, (n, n_blocks), gen, dev)
    out[sel] = shuffle_windows(x[sel], y0, x0, bh, bw, gen)
    return out


def shuffle_windows(x, y0, x0, bh, bw, gen, budget=2 ** 26):
    """x (n, C, H, W); window j of image i: rows y0[i, j] + [0, bh), columns x0[i, j] + [0, bw). As in the
    reference code every window reads the original image and later windows overwrite earlier ones where they
    overlap, so only the last window over each pixel matters: all windows are painted at once to find it
    (a scatter-max of window numbers), and only the windows still visible draw their permutation (argsort of
    random keys, padding last). The same permutation serves every channel.
    Memory: a few tensors of n x windows x slots. Beyond `budget` slots (the paper's size, a batch of 10 at
    256 px with 10,000 windows, holds 62.5 M), one image at a time, its windows in ranges, in the same order: on
    the CPU the same keys are drawn, so the same output."""
    n, C, H, W = x.shape
    dev, S, nb = x.device, int(bh.max() * bw.max()), y0.shape[1]
    whole = n * nb * S <= budget
    step = nb if whole else min(nb, max(1, budget // S))  # windows per range
    xs = x.flatten(2)
    o = xs.clone()
    last = torch.full((n * H * W,), -1, dtype=torch.long, device=dev)  # images' pixels apart: one buffer serves all
    for imgs in [slice(0, n)] if whole else [slice(i, i + 1) for i in range(n)]:
        ranges = [slice(j, j + step) for j in range(0, nb, step)]
        slots = lambda r: _window_slots(y0[imgs, r], x0[imgs, r], bh[imgs, r], bw[imgs, r], S, H, W, imgs.start,
                                        r.start)
        one = slots(ranges[0]) if len(ranges) == 1 else None  # computed once where the windows are one range
        for r in ranges:  # the last window over each pixel
            keep, flat, block, _ = one or slots(r)
            last.scatter_reduce_(0, flat[keep], block[keep], "amax")
        for r in ranges:
            keep, flat, block, at = one or slots(r)
            shows = keep & (last[flat] == block)
            wi = torch.nonzero(shows.any(-1), as_tuple=True)  # windows still visible somewhere
            keys = torch.where(keep[wi], _rand((len(wi[0]), S), gen, dev), 2.0)
            perm = torch.argsort(keys, dim=-1)               # first bh x bw entries: a random permutation
            m = shows[wi]
            dst, src = (flat[wi] % (H * W))[m], at(perm, wi)[m]
            im = (wi[0] + imgs.start)[:, None].expand_as(m)[m]
            o[im, :, dst] = xs[im, :, src]
    return o.view(n, C, H, W)


def _window_slots(y0, x0, bh, bw, S, H, W, first_image, first_window):
    """The S slots of each window (images, windows) of shuffle_windows, slot k at row k // bw, column k % bw:
    keep (the slot inside its window), flat (image-major pixel index, images numbered from first_image),
    block (the window's number, from first_window), and at(s, i): the pixel within its image of slots s of
    the windows i."""
    dev = y0.device
    k = torch.arange(S, device=dev)
    keep = k < (bh * bw)[..., None]                          # (images, windows, slots)
    at = lambda s, i: (y0[i][..., None] + s // bw[i][..., None]) * W + x0[i][..., None] + s % bw[i][..., None]
    img = (first_image + torch.arange(len(y0), device=dev)).view(-1, 1, 1) * (H * W)
    flat = torch.where(keep, img + at(k, ...), 0)
    block = (first_window + torch.arange(y0.shape[1], device=dev)).view(1, -1, 1).expand_as(flat)
    return keep, flat, block, at


def _interp(v, xp, fp):
    """np.interp per row: v (B, P), xp increasing (B, n), fp (B, n); clamped to fp's ends outside xp."""
    n = xp.shape[1]
    j = (torch.searchsorted(xp.contiguous(), v.contiguous(), right=True) - 1).clamp(0, n - 2)
    x0, x1, f0, f1 = xp.gather(1, j), xp.gather(1, j + 1), fp.gather(1, j), fp.gather(1, j + 1)
    w = ((v - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
    return f0 + w * (f1 - f0)


def nonlinear_transformation(x, gen, p=NONLINEAR_P, n_points=BEZIER_POINTS):
    """With probability p per image: intensities mapped through a cubic Bezier curve with end points (0, 0),
    (1, 1) and two random control points; with probability 0.5 the mapping is decreasing (the reference
    code sorts only the x values of the curve then)."""
    B, dev = len(x), x.device
    do = _rand(B, gen, dev) < p
    P = _rand((B, 2, 2), gen, dev)                                        # control points P1, P2: (x, y)
    t = torch.linspace(0, 1, n_points, device=dev)
    # reference code's Bernstein order: points[i] has weight C(3, i) t^(3-i) (1-t)^i; P0 = (0, 0), P3 = (1, 1)
    w1, w2, w3 = 3 * t ** 2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3
    xv = P[:, 0, :1] * w1 + P[:, 1, :1] * w2 + w3
    yv = P[:, 0, 1:] * w1 + P[:, 1, 1:] * w2 + w3
    decreasing = (_rand(B, gen, dev) < 0.5)[:, None]
    xv = xv.sort(1).values
    yv = torch.where(decreasing, yv, yv.sort(1).values)
    mapped = _interp(x.flatten(1).float(), xv, yv).view_as(x)
    return torch.where(do.view(B, 1, 1, 1), mapped, x)


def image_painting(x, gen, p=PAINT_P, p_out=OUTPAINT_P):
    """With probability p per image, out-painting (p_out) or in-painting (1 - p_out).
    In-painting: up to 5 blocks of side in [H/6, H/3] (another block while rand < 0.95) filled with uniform
    noise. Out-painting: noise everywhere except windows of side H - randint(3H/7, 4H/7) that keep the
    image: one, then up to 4 more while rand < 0.95. Block corners at least 3 pixels from the border."""
    B, C, H, W = x.shape
    dev = x.device
    paint, outp = _rand(B, gen, dev) < p, _rand(B, gen, dev) < p_out
    more = lambda k: (_rand((B, k), gen, dev) < 0.95).int().cumprod(1).bool()
    h, w = _randint(H // 6, H // 3, (B, 5), gen, dev), _randint(W // 6, W // 3, (B, 5), gen, dev)
    y0, x0 = _randint(3, H - h - 3, (B, 5), gen, dev), _randint(3, W - w - 3, (B, 5), gen, dev)
    holes = (_boxes(H, W, y0, x0, h, w) & more(5)[..., None, None]).any(1, keepdim=True)
    h = H - _randint(3 * H // 7, 4 * H // 7, (B, 5), gen, dev)
    w = W - _randint(3 * W // 7, 4 * W // 7, (B, 5), gen, dev)
    y0, x0 = _randint(3, H - h - 3, (B, 5), gen, dev), _randint(3, W - w - 3, (B, 5), gen, dev)
    first = torch.ones(B, 1, dtype=torch.bool, device=dev)
    windows = (_boxes(H, W, y0, x0, h, w) & torch.cat([first, more(4)], 1)[..., None, None]).any(1, keepdim=True)
    noise = _rand((B, 1, H, W), gen, dev).expand_as(x)
    inpainted, outpainted = torch.where(holes, noise, x), torch.where(windows, x, noise)
    m = lambda t: t.view(B, 1, 1, 1)
    return torch.where(m(paint & outp), outpainted, torch.where(m(paint & ~outp), inpainted, x))


def models_genesis(x, gen, n_blocks=10000):
    """D(x) of Eq. 1 in the reference code's order: flip, local pixel shuffling, non-linear intensity,
    painting, each drawn independently (an image may come through untouched). Returns (input, target):
    the target is the flipped clean image."""
    target = flip(x, gen)
    x = local_pixel_shuffling(target, gen, n_blocks=n_blocks)
    x = nonlinear_transformation(x, gen)
    return image_painting(x, gen), target


def pretrain(run, x, pool, pool_ids, args, device):
    """Eq. 1: min_theta sum_i l(f(D(x_i); theta), x_i) on the unlabelled pool, l = L2 between sigmoid(output)
    and the clean image (all --channels). Returns the U-Net's state dict, the losses and the seconds, and saves
    them as ssl_weights.pt in the run folder. --ssl-optim adam: ours (paper silent); sgd: the authors' code
    (SGD momentum 0.9, lr 0.01, batch 1, step decay; the step, 40 epochs x 0.5, is the Models Genesis PyTorch
    code's StepLR(0.8 x patience 50)).
    Their early stopping watches a validation loss on test images: left out, the run trains --ssl-epochs.
    The first epoch, and then any epoch ending SAVE_EVERY_S or more after the last save, ends with ssl_pretrain.pt
    (model, optimiser, schedule, generators): --resume continues from that epoch, with the same result as a run
    never stopped; a stop loses the epoch in progress and at most a minute before it (saving every epoch cost 4 %
    of an H200's pre-training)."""
    t0 = time.time()
    model = common.prepare_model(ssl_unet(args), device, args.compile)
    if args.ssl_optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.ssl_lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    else:
        opt, sched = torch.optim.Adam(model.parameters(), lr=args.ssl_lr), None
    gen = torch.Generator(device=device).manual_seed(args.seed)   # the corruptions
    order = torch.Generator().manual_seed(args.seed)             # batch order
    saved = run.path("ssl_pretrain.pt")
    done = dict(epoch=0, losses=[], seconds=0.0)
    if args.resume and os.path.isfile(saved):  # a run stopped while pre-training: on from its last epoch
        try:  # a file cut short, or one that does not fit (config.json's width edited, another run's file)
            state = torch.load(saved, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            if sched is not None:
                sched.load_state_dict(state["sched"])
            order.set_state(state["order"])
            done = {k: state[k] for k in done}
        except Exception as e:
            raise common.UserError(f"{saved}: unreadable, or not this run's ({type(e).__name__}); remove it to "
                                   "pre-train from the start")
        if state.get("device") == device.type:
            gen.set_state(state["gen"])
        else:  # a resume may change --device; a generator's state does not carry from one device type to another
            gen.manual_seed(args.seed + done["epoch"])
            print(f"note: pre-training started on {state.get('device')}, goes on on {device.type}: its corruptions "
                  f"from epoch {done['epoch'] + 1} on are drawn afresh, not as a run that never stopped would")
        run.offset_s = done["seconds"]  # the elapsed time counts the stopped process's pre-training
        print(f"resume: pre-training after epoch {done['epoch']} of {args.ssl_epochs}")
    run.truncate_csv("ssl_epochs.csv", done["epoch"], "epoch")

    losses, saved_at, first_end = list(done["losses"]), None, None  # this process's last save, its first epoch's end
    for e, loss, s in common.train_epochs(
            model, opt, x, x, pool, args.ssl_epochs - done["epoch"], args.ssl_batch_size, device=device, amp=args.amp,
            loss_fn=lambda out, clean: F.mse_loss(torch.sigmoid(out.float()), clean),
            augment=lambda xb, _: models_genesis(xb, gen, args.shuffle_blocks), generator=order, lr_flag="--ssl-lr"):
        epoch = done["epoch"] + e + 1
        run.append_csv("ssl_epochs.csv", {"epoch": epoch, "loss": loss, "seconds": s})
        if sched is not None:
            sched.step()
        losses.append(loss)
        # saved after this process's first epoch, then each SAVE_EVERY_S (the last epoch's: ssl_weights.pt, below)
        if saved_at is None or time.time() - saved_at >= SAVE_EVERY_S and epoch < args.ssl_epochs:
            state = dict(epoch=epoch, losses=losses, seconds=done["seconds"] + time.time() - t0,
                         model=model.state_dict(), opt=opt.state_dict(), sched=sched and sched.state_dict(),
                         gen=gen.get_state(), order=order.get_state(), device=device.type)
            torch.save(state, saved + ".tmp")
            os.replace(saved + ".tmp", saved)  # whole or absent
            saved_at = time.time()
        first_end = first_end or time.time()  # the first epoch (set-up, warm-up, cuDNN's search) gives no rate
        each = (time.time() - first_end) / e if e else None
        print(f"  ssl epoch {epoch}/{args.ssl_epochs} L2 loss {loss:.5f} ({s:.1f}s) | "
              f"{common.fmt_s(run.elapsed())} elapsed, pre-training ETA "
              f"{'--' if each is None else common.fmt_s(each * (args.ssl_epochs - epoch))}", flush=True)
    state, seconds = {k: v.cpu() for k, v in model.state_dict().items()}, done["seconds"] + time.time() - t0
    torch.save({"state_dict": state, "width": args.width, "image_size": args.image_size, "data": args.data,
                "channels": args.channels, "up": args.up, "ssl_optim": args.ssl_optim, "pool": list(pool_ids),
                "epochs": args.ssl_epochs, "losses": losses, "seconds": seconds}, run.path("ssl_weights.pt.tmp"))
    os.replace(run.path("ssl_weights.pt.tmp"), run.path("ssl_weights.pt"))  # whole or absent: --resume loads it
    if os.path.isfile(saved):
        os.remove(saved)  # ssl_weights.pt holds the pre-training now
    ssl_panel(run, model, x, pool, gen, args, device)
    return state, losses, seconds


def load_ssl_weights(path, args, pool_ids):
    """A state dict saved by pretrain(); checked against this run's width and image size."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:120]  # torch's own message runs to several sentences
        raise common.UserError(f"--ssl-weights {path}: unreadable ({type(e).__name__}: {first}); expected the "
                               f"ssl_weights.pt of an earlier run")
    if not (isinstance(saved, dict) and "state_dict" in saved):
        raise common.UserError(f"--ssl-weights {path}: expected the ssl_weights.pt that ssl_coldstart.py writes")
    for key, old in (("width", None), ("image_size", None), ("channels", 1), ("up", "transpose")):
        if saved.get(key, old) != getattr(args, key):
            raise common.UserError(f"--ssl-weights {path}: pre-trained with --{key.replace('_', '-')} "
                                   f"{saved.get(key, old)}, this run uses {getattr(args, key)}")
    if saved.get("pool") != list(pool_ids):
        print(f"note: {path} was pre-trained on a different pool (another --seed or --split); the self-supervised "
              f"model may have seen this run's test images (never their labels). Pre-train once per seed.")
    return saved["state_dict"], saved.get("losses", []), saved.get("seconds")


def ssl_unet(args):
    """The reconstruction U-Net: the segmentation U-Net's body, one output channel per input channel."""
    return UNet(args.channels, args.channels, args.width, up=args.up)


def init_from_ssl(model, state, head=False):
    """Sec. III-C: the segmentation U-Net starts from the self-supervised weights. The 1x1 output head
    (`head.*`, trained to output intensities) is left at its random initialisation unless head=True, as
    in the authors' segmentation code, which loads every key but `outc` (--transfer-head copies it).
    Deep-supervision heads (dsal) are not in `state`. Returns the keys left at their initialisation."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if head or not k.startswith("head.")}
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    bad += [k for k in missing if not k.startswith(("aux.", "head."))]
    if bad:
        raise common.UserError(f"the self-supervised weights do not fit the segmentation U-Net: {bad[:5]}")
    model.load_state_dict(state, strict=False)
    return missing


# ----------------------------------------------------------------------------------------------------------
# Sec. III-B: embedded feature clustering
# ----------------------------------------------------------------------------------------------------------
def cluster_ranking(feats, k, seed):
    """Eq. 2: K-means on the pooled features (N, d). Returns each sample's cluster, its rank inside the
    cluster by L2 distance to the centroid (0 = nearest, the "centroid" sample) and that distance."""
    feats = np.asarray(feats, dtype=np.float64)
    if k > len(feats):
        raise common.UserError(f"--clusters {k}: more clusters than the {len(feats)} pool samples")
    km = common.kmeans(feats, k, seed)
    # (paper silent on the K-means settings: scikit-learn's k-means++ with 10 restarts; the authors' code runs
    # kmeans_pytorch once from a random start and ranks every sample by its distance to each centroid, members
    # or not, so one sample may serve two clusters: "in cluster C_i" (Sec. III-B) read as members only here)
    labels = km.labels_.astype(np.int64)
    dist = np.linalg.norm(feats - km.cluster_centers_[labels], axis=1)
    rank = np.zeros(len(feats), np.int64)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        rank[members[np.argsort(dist[members], kind="stable")]] = np.arange(len(members))
    return labels, rank, dist


def cluster_quota(sizes, C):
    """Sec. III-B: N_Ci = ceil(C x N_i / N). The ceilings add up to C + E with 0 <= E < k; to select exactly C
    we take one sample back from the E clusters rounded up the most (largest ceil(q_i) - q_i; ties: the higher
    cluster index first). That is the largest-remainder apportionment of C, computed in integers. A cluster
    whose share C N_i / N is below one sample is rounded up the most, so it can end with none, its centroid
    included (the paper's ceilings, C + E samples, would keep it)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    N = int(sizes.sum())
    q = -(-C * sizes // N)                           # ceil(C N_i / N), exact
    excess = q * N - C * sizes                       # N x (ceil(q_i) - q_i)
    E = int(q.sum()) - C
    order = np.lexsort((-np.arange(len(sizes)), -excess))  # largest excess first, then higher index
    q[order[:E]] -= 1
    return q


def continue_quota(sizes, have, n_new, avail=None):
    """Later iterations continue the ranking: the labelled count C_t = have + n_new is shared in proportion to
    the cluster sizes, one sample at a time to the cluster furthest below its share C_t N_i / N (ties: lower
    index), skipping clusters with nothing left. From have = 0 this is cluster_quota (tested); unlike
    recomputing cluster_quota(C_t) it never takes back an earlier pick."""
    sizes, have = np.asarray(sizes, np.int64), np.asarray(have, np.int64).copy()
    avail = sizes - have if avail is None else np.asarray(avail, np.int64).copy()
    N, C_t = int(sizes.sum()), int(have.sum()) + n_new
    inc = np.zeros(len(sizes), np.int64)
    for _ in range(min(n_new, int(avail.sum()))):
        deficit = np.where(avail > 0, C_t * sizes - have * N, np.iinfo(np.int64).min)
        i = int(np.argmax(deficit))
        have[i], inc[i], avail[i] = have[i] + 1, inc[i] + 1, avail[i] - 1
    return inc


def take_from_clusters(labels, rank, available, inc):
    """Cluster i gives its inc[i] best-ranked available samples (centroid first, then its nearest
    neighbours). Positions into the clustered set."""
    out = [np.zeros(0, np.int64)]
    for i, n in enumerate(inc):
        members = np.flatnonzero((labels == i) & available)
        out.append(members[np.argsort(rank[members], kind="stable")][:n])
    return np.concatenate(out)


@torch.inference_mode()
def pooled_features(model, x, idx, batch_size, device, amp=False, grid=1):
    """Last encoder stage features of x[idx], adaptive-average-pooled to grid x grid and flattened, in one
    batched pass (eval mode): (N, C * grid^2) float32 on the CPU (one copy at the end: no host sync per batch)."""
    out = [F.adaptive_avg_pool2d(f.float(), grid).flatten(1) for _, f in
           common.forward_batches(model, x, idx, batch_size, device, amp, fn=lambda m, xb: m.features(xb))]
    return torch.cat(out).cpu() if out else torch.zeros(0, model.feature_channels * grid * grid)


def ssl_features(state, x, train_ids, args, device):
    """Last encoder stage of the pre-trained U-Net on the clean pool images, in pool order (eval mode, no
    corruption: the public code clusters randomly drawn corrupted images, so its picks do not index the
    pool), pooled to aap_grid x aap_grid and flattened: (N, 16 x width x grid^2)."""
    model = common.prepare_model(ssl_unet(args), device, args.compile)
    model.load_state_dict(state)
    feats = pooled_features(model, x, train_ids, args.batch_size, device, args.amp, grid=args.aap_grid)
    assert len(feats) == len(train_ids)
    return feats.numpy()


def cluster_query(labels, rank, train_ids, pool, n_new):
    """Dataset indices of the next n_new samples of the cluster ranking (labels, rank index train_ids)."""
    available = np.isin(train_ids, pool)
    sizes = np.bincount(labels, minlength=labels.max() + 1)
    have = np.bincount(labels[~available], minlength=len(sizes))
    avail = np.bincount(labels[available], minlength=len(sizes))
    inc = cluster_quota(sizes, n_new) if have.sum() == 0 else continue_quota(sizes, have, n_new, avail)
    return train_ids[take_from_clusters(labels, rank, available, inc)]


# ----------------------------------------------------------------------------------------------------------
# Fig. 2 comparators (query rules shared with other scripts live in common.py)
# ----------------------------------------------------------------------------------------------------------
DSAL_STAGES = (1, 2)  # DSAL, JBHI 2021 [5], public code: heads after decoder stages 1 and 2 (0 = lowest resolution)


def dsal_loss(out, target):
    """DSAL ([5], its public code's loss_weights [0.6, 0.3, 0.1]): Eq. 3's CE + Dice on the final head (0.6), the
    head after decoder stage 1 (1/4 resolution, 0.3) and the one after stage 2 (1/2, 0.1; its "L-DSC")."""
    logits, (s1, s2) = out
    L = common.bce_dice_loss
    return 0.6 * L(logits, target) + 0.3 * L(s1, target) + 0.1 * L(s2, target)


@torch.inference_mode()
def dsal_scores(model, x, pool, args, device):
    """Per pool image: the mean of Dice(final, stage-1 head) ("M-DSC") and Dice(final, stage-2 head) ("L-DSC")
    of the binarised heads, those two terms, the confidence mean |p - 0.5| of the final head (the JBHI code's
    pseudo-label filter), and the final head's mask (the pseudo-label)."""
    agree, l_dsc, m_dsc, conf, masks = [], [], [], [], []
    for _, (logits, (s1, s2)) in common.forward_batches(model, x, pool, args.batch_size, device, args.amp):
        p = torch.sigmoid(logits.float()[:, 0])
        m = lambda t: torch.sigmoid(t.float()[:, 0]) > 0.5
        a, lo, mid = common.head_agreement(m(s2), m(s1), p > 0.5)
        agree.append(a), l_dsc.append(lo), m_dsc.append(mid)
        conf.append((p - 0.5).abs().flatten(1).mean(1))
        masks.append((p > 0.5).to(torch.uint8))
    cat = lambda v: torch.cat(v).cpu().numpy()
    return cat(agree), cat(l_dsc), cat(m_dsc), cat(conf), torch.cat(masks)


def dsal_pseudo(agreement, confidence, exclude, n, bins=10):
    """DSAL's weak labeller ([5], public code with CONF_THRES): among the pool samples whose confidence lies in
    the top bin of a 10-bin histogram, the n with the highest head agreement; fewer there: filled with the
    highest agreement of the rest. `exclude` (this round's oracle picks) never gets a pseudo-label. Positions."""
    keep = np.setdiff1d(np.arange(len(agreement)), exclude)
    if n <= 0 or len(keep) == 0:
        return np.zeros(0, np.int64)
    edges = np.histogram(confidence[keep], bins=bins)[1]
    by_agreement = lambda idx: idx[np.argsort(-agreement[idx], kind="stable")]
    picks = by_agreement(keep[confidence[keep] >= edges[-2]])[:n]
    if len(picks) < n:
        picks = np.concatenate([picks, by_agreement(np.setdiff1d(keep, picks))[:n - len(picks)]])
    return picks.astype(np.int64)


def ensemble_js(probs):
    """ens-JS (Kuo et al. 2018): per pixel JS = H(mean_m p_m) - mean_m H(p_m), Bernoulli entropy, summed over
    pixels -> (B,). Their cost-sensitive knapsack is top-b when every image costs the same."""
    p = probs.float()
    return (common.binary_entropy(p.mean(0)) - common.binary_entropy(p).mean(0)).flatten(1).sum(1)


def ensemble_scores(members, x, pool, args, device):
    """From the M members' probabilities p_m per pool image: "entropy", the Shannon entropy of the ensemble mean
    H(mean_m p_m) summed over pixels (ens-S; the authors' DSAL code's ensemble_S, there in nats, here in bits:
    the same ranking); "js", the Jensen-Shannon divergence summed over pixels (ens-JS, Kuo et al.); "variance",
    the pixel variance across members averaged over pixels (Suggestive Annotation's uncertainty)."""
    out = {"entropy": [], "js": [], "variance": []}
    for outs in zip(*[common.predict_batches(m, x, pool, args.batch_size, device, args.amp) for m in members]):
        p = torch.stack([p for _, p in outs])
        out["entropy"].append(common.entropy_scores(p.mean(0), reduce="sum"))
        out["js"].append(ensemble_js(p))
        out["variance"].append(common.ensemble_variance(p))
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}


def facility_location(cand_feats, pool_feats, k):
    """Greedy max of F(S) = sum_{u in pool} max_{s in S} cos(f_s, f_u) over S within the candidates (ens-S's
    representativeness step). Returns positions into cand_feats, in the order chosen."""
    c = F.normalize(torch.as_tensor(cand_feats).float(), dim=1)
    u = F.normalize(torch.as_tensor(pool_feats).float(), dim=1)
    sim = c @ u.T                                 # (K, N)
    best = torch.full((u.shape[0],), -1.0)        # current max similarity of each pool sample to S (cos >= -1)
    chosen = []
    for _ in range(min(k, len(c))):
        gain = torch.clamp(sim - best, min=0).sum(1)
        if chosen:
            gain[chosen] = -1
        j = int(torch.argmax(gain))
        chosen.append(j)
        best = torch.maximum(best, sim[j])
    return np.array(chosen, dtype=np.int64)


# pool_scores.csv columns: the scores each rule uses (and the ones computed beside them)
SCORE_COLUMNS = {"cluster": ["cluster", "rank", "distance"], "random": [], "mc-dropout": ["mc_variance"],
                 "ceal": ["mc_variance"], "ens-s": ["ens_entropy", "ens_js", "ens_variance"],
                 "ens-js": ["ens_entropy", "ens_js", "ens_variance"],
                 "suggestive": ["ens_entropy", "ens_js", "ens_variance", "sa_candidate"],
                 "dsal": ["agreement", "m_dsc", "l_dsc", "confidence"], "full": []}


def query(strategy, rnd, model, members, x, pool, args, device, rng):
    """One iteration's picks for a comparator: ({how: positions into pool}, {pool_scores.csv column: value per
    pool sample}, the rule's score per pool sample, pseudo-label masks per pool sample or None)."""
    n, at = min(args.query, len(pool)), np.arange(len(pool))
    if strategy in ("mc-dropout", "ceal"):      # MC dropout: sum of the pixel variances over T passes
        scores, masks = common.mc_variance(model, x, pool, args.mc_passes, args.batch_size, device, args.amp)
        cols = {"mc_variance": scores}
        if strategy == "ceal":                  # CEAL: lowest, highest, low band; most confident pseudo-labelled,
            n_low = n_high = round(n * 2 / 7)   # pseudo_step new ones a round (ceal_mcdropout.py --pseudo-mode total)
            g = common.ceal_groups(scores, n_low, n_high, n - n_low - n_high, args.pseudo_step, rng)
            return {"oracle-lowest": g[0], "oracle-highest": g[1], "oracle-band": g[2], "pseudo": g[3]}, cols, \
                scores, masks
        return {"oracle-mc-dropout": common.top_k(at, scores, n)}, cols, scores, masks
    if strategy in ("ens-s", "ens-js", "suggestive"):
        e = ensemble_scores(members, x, pool, args, device)
        cols = {"ens_entropy": e["entropy"], "ens_js": e["js"], "ens_variance": e["variance"]}
        if strategy == "ens-s":                 # top-b by the Shannon entropy of the ensemble mean
            return {"oracle-ens-s": common.top_k(at, e["entropy"], n)}, cols, e["entropy"], None
        if strategy == "ens-js":                # top-b: the knapsack of Kuo et al. when every image costs the same
            return {"oracle-ens-js": common.top_k(at, e["js"], n)}, cols, e["js"], None
        # Suggestive Annotation: the K = 2k most uncertain (variance), then k by facility location over the pool
        cand = common.top_k(at, e["variance"], 2 * n)
        feats = torch.stack([pooled_features(m, x, pool, args.batch_size, device, args.amp)
                             for m in members]).mean(0)  # paper silent: the members' mean descriptor
        cols["sa_candidate"] = np.isin(at, cand).astype(np.int64)
        picks = cand[facility_location(feats[torch.as_tensor(cand)], feats, n)]
        return {"oracle-suggestive": picks}, cols, e["variance"], None
    # dsal ([5]): the lowest head agreement to the oracle (strong labeller); from iteration --dsal-pseudo-from on,
    # pseudo_step x (t - from + 1) confident, high-agreement samples pseudo-labelled by the final head (weak
    # labeller; the JBHI code: 20 + 20 (t - 5)), re-drawn every iteration
    agree, l_dsc, m_dsc, conf, masks = dsal_scores(model, x, pool, args, device)
    oracle = common.top_k(at, agree, n, largest=args.dsal_select == "highest")
    picks = {"oracle-dsal": oracle}
    if args.dsal_pseudo_from > 0 and rnd >= args.dsal_pseudo_from:
        picks["pseudo"] = dsal_pseudo(agree, conf, oracle, args.pseudo_step * (rnd - args.dsal_pseudo_from + 1))
    return picks, {"agreement": agree, "m_dsc": m_dsc, "l_dsc": l_dsc, "confidence": conf}, agree, masks


def minmax_uint8(x):
    """Sec. IV-A: min-max normalisation, per image (paper silent on per image or per set), kept as uint8."""
    lo = x.min(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    hi = x.max(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    return np.round((x - lo) * 255 / np.maximum(hi - lo, 1)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# The steps of main() particular to this script, in the order main() runs them
# ----------------------------------------------------------------------------------------------------------
def prepare_data(data, args):
    """Sec. IV-A: ISIC 2017's pool and test set are drawn from its 2000 training images (the official
    validation and test sets are left out); every image min-max normalised (minmax_uint8)."""
    if args.data == "isic2017" and "train" in data.official:
        data = data.subset(data.official["train"])  # Sec. IV-A: 1600 pool + 400 test drawn from the 2000
        data.official = {}
    data.x = minmax_uint8(data.x)
    return data


def pretrain_or_load(run, data, x, train_ids, args, device):
    """Sec. III-A: the self-supervised U-Net, pre-trained here on the unlabelled pool (Eq. 1; pretrain()) or
    loaded from --ssl-weights (or from this run's ssl_weights.pt on --resume). Returns (its state dict, the
    pre-training losses, the seconds it took: this run's pre-training, read back on --resume; with
    --ssl-weights, the loading)."""
    t0 = time.time()
    if "cluster" in (args.strategy, args.cold_start) and args.clusters > len(train_ids):  # before pre-training
        raise common.UserError(f"--clusters {args.clusters}: more clusters than the {len(train_ids)} pool samples")
    pool_ids = [data.ids[i] for i in train_ids]
    saved = args.ssl_weights or run.path("ssl_weights.pt")
    if args.ssl_weights and not os.path.isfile(args.ssl_weights):
        raise common.UserError(f"--ssl-weights {args.ssl_weights}: file not found (expected the ssl_weights.pt "
                               f"of an earlier run)")
    if not os.path.isfile(saved):
        return pretrain(run, x, train_ids, pool_ids, args, device)
    ssl_state, ssl_losses, seconds = load_ssl_weights(saved, args, pool_ids)
    print(f"ssl: weights from {saved}")
    if not args.ssl_weights and os.path.isfile(run.path("ssl_pretrain.pt")):
        os.remove(run.path("ssl_pretrain.pt"))  # a run stopped after writing ssl_weights.pt, before removing it
    return ssl_state, ssl_losses, seconds if seconds is not None and not args.ssl_weights else time.time() - t0


def build_models(ssl_state, args, device):
    """Sec. III-C: the segmentation U-Net, started from the self-supervised weights with --ssl-init
    (init_from_ssl), and for ens-s / ens-js / suggestive (Fig. 2 comparators) the --ensemble-size members.
    Returns (model, members)."""
    net = lambda: common.prepare_model(UNet(args.channels, 1, args.width, up=args.up, dropout=args.dropout,
                                            dropout_at="bottleneck",
                                            deep_supervision=DSAL_STAGES if args.strategy == "dsal" else ()),
                                       device, args.compile)
    model = net()
    if args.ssl_init:
        init_from_ssl(model, ssl_state, head=args.transfer_head)
    # ensemble members: each from its own random initialisation (the diversity an ensemble needs; SSL weights
    # would start them all from one point), trained on bootstrap resamples; they only score the pool
    members = [net() for _ in range(args.ensemble_size if args.strategy in ("ens-s", "ens-js", "suggestive") else 0)]
    return model, members


def resume_sets(state, members, opts):
    """--resume: the ensemble members and their optimisers of the last finished round. Returns (labeled,
    pseudo, pool, clusters)."""
    for m, o, s in zip(members, opts, state["members"]):
        m.load_state_dict(s["model"])
        o.load_state_dict(s["opt"])
    return state["labeled"], state["pseudo"], state["pool"], state["clusters"]


def cluster_pool(run, data, ssl_state, x, train_ids, args, device):
    """Sec. III-B, once before the cold start: the self-supervised features of the whole pool (ssl_features)
    clustered by K-means (Eq. 2, cluster_ranking); writes clusters.csv and clusters.png. Returns (labels, rank,
    distance) over train_ids."""
    feats = ssl_features(ssl_state, x, train_ids, args, device)
    clusters = cluster_ranking(feats, args.clusters, args.seed)
    write_clusters(run, data, train_ids, clusters)
    return clusters


def select(way, rnd, model, members, x, pool, train_ids, clusters, args, device, rng):
    """One round's picks by `way`: the cluster ranking (Sec. III-B: the cold start, N_Ci = ceil(C x N_i / N)
    nearest the centroid first, then its continuation), random, the whole pool (full) or a Fig. 2 comparator
    (query). Returns ({how: dataset indices}, {pool_scores.csv column: value per pool sample}, {dataset index:
    score} for picks/round_K.png or None, {"score_selected", "score_pool"} for rounds.csv, the pseudo-labels'
    masks or None)."""
    queried, scores, score_sel, pseudo_masks = {}, None, float("nan"), None
    n_new = args.initial if rnd == 0 else args.query
    uses_clusters = clusters is not None  # main() clusters the pool at round 0 exactly when it uses clusters
    cols = {c: [""] * len(pool) for c in SCORE_COLUMNS["cluster"] * uses_clusters + SCORE_COLUMNS[args.strategy]}
    if uses_clusters:  # the cluster ranking of every pool sample, whatever the rule of this round
        at = np.searchsorted(train_ids, pool)
        cols.update(cluster=clusters[0][at], rank=clusters[1][at], distance=clusters[2][at])
    if way == "cluster":
        new = cluster_query(clusters[0], clusters[1], train_ids, pool, n_new)
        score_sel = float(clusters[2][np.searchsorted(train_ids, new)].mean())  # distance to the centroid
        queried["oracle-cluster"] = new
        shown = dict(zip(pool.tolist(), cols["distance"]))
    elif way == "full":  # the ceiling: the oracle labels the whole pool
        queried["full"] = pool.copy()
        shown = None
    elif way == "random":
        queried["oracle-random"] = common.query_random(pool, n_new, rng)
        shown = None
    else:
        picks, score_cols, scores, masks = query(way, rnd, model, members, x, pool, args, device, rng)
        queried = {how: pool[g] for how, g in picks.items()}
        cols.update(score_cols)
        score_sel = float(np.mean(scores[np.concatenate([g for how, g in picks.items() if how != "pseudo"])]))
        shown = dict(zip(pool.tolist(), scores))
        if "pseudo" in picks:  # their targets: the model's masks
            pseudo_masks = masks[torch.as_tensor(picks["pseudo"], device=device)]
    scored = {"score_selected": score_sel,
              "score_pool": float(np.mean(scores)) if scores is not None else float("nan")}
    return queried, cols, shown, scored, pseudo_masks


def train_members(members, opts, x, target, labeled, epochs, loss_fn, args, device, rng, gen):
    """ens-s / ens-js / suggestive (Fig. 2 comparators): M models on bootstrap resamples of the labelled set,
    each round as many epochs as the segmentation model, each by its own Adam kept across rounds (paper silent; the
    DSAL code the ensembles come from compiles its Keras models once) (no members: nothing to do)."""
    for m, o in zip(members, opts):
        common.train(m, o, x, target, rng.choice(labeled, len(labeled), replace=True), epochs, args.batch_size,
                     device=device, amp=args.amp, loss_fn=loss_fn, generator=gen)


def main(argv=None):
    args = parse_args(argv)
    if args.tables:
        return tables(args)
    run, device = common.Run.start(__file__, args, parse_args)

    # ---- data: grayscale (Sec. IV-A; --channels 3 for RGB), min-max normalised; ISIC 2017: pool and test from the
    # 2000 training images ----
    data = common.load_data(args.data, args.data_dir, args.image_size, args.channels, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    data = prepare_data(data, args)
    # other data: the ISIC shares, C = 300 and +35 of the 1600 pool (Sec. IV-A)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 300, 35, 1600, pseudo=20)
    common.check_budget(len(train_ids), args.initial, args.query, args.rounds)
    rounds, epochs0, steps = common.ceiling(args, len(train_ids))  # --strategy full: the ceiling
    x, y = common.to_device(data, device)

    # ---- Sec. III-A: self-supervised pre-training on the unlabelled pool (or its weights, reused) ----
    uses_clusters = "cluster" in (args.strategy, args.cold_start)
    ssl_state, ssl_losses, ssl_s = pretrain_or_load(run, data, x, train_ids, args, device) \
        if args.ssl_init or uses_clusters else (None, [], 0.0)
    common.seed_everything(args.seed + 1, args.deterministic)  # what follows is the same whether SSL ran or loaded

    # ---- models (Sec. III-C), optimisers, sets ----
    model, members = build_models(ssl_state, args, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    opts = [torch.optim.Adam(m.parameters(), lr=args.lr) for m in members]
    loss_fn = dsal_loss if args.strategy == "dsal" else common.bce_dice_loss  # Eq. 3: CE + Dice
    # rng: query draws, bootstrap resamples; gen: batch order
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)
    labeled, pseudo, pool = np.zeros(0, np.int64), np.zeros(0, np.int64), train_ids.copy()
    clusters = None                                 # (labels, rank, dist) over train_ids
    start, state = run.resume(model, opt, rng, gen)
    oracle.restore(run, start, data, y)  # --oracle folder: the person's labels of the finished rounds
    if state:
        labeled, pseudo, pool, clusters = resume_sets(state, members, opts)
    target = common.training_target(y, labeled, pseudo, state["pseudo_masks"] if state else None)
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(len(train_ids) if args.strategy == "full" else args.initial,
                                                         args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - args.initial,
                                                         scored=args.strategy not in ("cluster", "random", "full"),
                                                         pseudo=(lambda r: args.pseudo_step * r)
                                                         if args.strategy == "ceal" else None))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        # ---- selection: round 0 is the cold start (Sec. III-B), then the strategy's query rule ----
        t0 = time.time()
        if rnd == 0 and uses_clusters:
            clusters = cluster_pool(run, data, ssl_state, x, train_ids, args, device)
        way = "full" if args.strategy == "full" else args.cold_start if rnd == 0 else args.strategy
        queried, cols, shown, scored, pseudo_masks = select(way, rnd, model, members, x, pool, train_ids, clusters,
                                                            args, device, rng)
        run.log_pool_scores(rnd, [data.ids[i] for i in pool], cols,
                            {how: [data.ids[i] for i in ids] for how, ids in queried.items()})
        common.save_picks(run, rnd, model, data, x, queried, shown, args.batch_size, device, args.amp)
        new = np.concatenate([i for how, i in queried.items() if how != "pseudo"])
        select_s = time.time() - t0
        oracle.ask(run, rnd, new, data, y, model, x, args.batch_size, device, args.amp)
        t0 = time.time()
        labeled, pseudo, pool = common.add_labels(target, y, queried, pseudo_masks, labeled, pseudo, pool,
                                                  redraw=args.strategy == "dsal")  # DSAL's stay in the pool

        # ---- training: fine-tuned, 10 epochs then 2 per iteration, a new Adam each round (authors' train.py) ----
        epochs, opt = epochs0 if rnd == 0 else args.epochs, torch.optim.Adam(model.parameters(), lr=args.lr)
        for e, loss, _ in common.train_epochs(model, opt, x, target, np.concatenate([labeled, pseudo]), epochs,
                                              args.batch_size, device=device, amp=args.amp, loss_fn=loss_fn,
                                              generator=gen, steps=steps):
            progress.epoch(rnd, e, epochs, loss)
        train_members(members, opts, x, target, labeled, epochs, loss_fn, args, device, rng, gen)
        train_s = time.time() - t0

        # ---- evaluation on the test set; the round is written before anything else happens ----
        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        covered = "" if clusters is None else int(len(np.unique(clusters[0][np.isin(train_ids, labeled)])))
        row = common.round_row(rnd, len(labeled), len(pseudo), dice, iou, train_s, select_s, pool_left=len(pool),
                               **scored, clusters_covered=covered)
        run.end_round(row, {how: [data.ids[i] for i in ids] for how, ids in queried.items()}, progress, model, opt,
                      rng, gen, members=[{"model": m.state_dict(), "opt": o.state_dict()} for m, o in zip(members, opts)],
                      labeled=labeled, pseudo=pseudo, pool=pool, clusters=clusters,
                      pseudo_masks=target[torch.as_tensor(pseudo, device=device)].cpu())

    oracle.predict_rest(run, model, data, x, np.setdiff1d(train_ids, labeled), args.batch_size, device, args.amp)
    panel(run, model, data, x, pool if len(pool) else test_ids, args, device)
    return run.finish({"ssl_loss_final": ssl_losses[-1] if ssl_losses else None, "ssl_s": ssl_s,
                       "ssl_weights": None if ssl_state is None else args.ssl_weights or run.path("ssl_weights.pt"),
                       "paper_dice": paper_final(args)})


def method(a):
    """A run's column name in the tables, from its flags (a dict): the feature dimension is 16 x width x grid^2."""
    if a["strategy"] != "cluster":
        return a["strategy"]
    return f"cluster k={a['clusters']} AAP {16 * int(a['width']) * int(a['aap_grid']) ** 2}"


def paper_final(args):
    """The paper's Dice after T = 9 iterations for this configuration (Table II, without SSL weights only)."""
    name = method(vars(args))
    if args.data != "isic2017" or args.ssl_init or name not in PAPER_TABLE_II_COLS:
        return None
    return PAPER_TABLE_II[9][PAPER_TABLE_II_COLS.index(name)]


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def ssl_panel(run, model, x, pool, gen, args, device, n=4):
    """Clean image / corrupted input D(x) / reconstruction, for a few pool samples."""
    shown = []

    def corrupt(xb):  # D(x), kept with the clean image for the panel
        shown.append(models_genesis(xb, gen, args.shuffle_blocks))
        return shown[-1][0]

    rec = [torch.sigmoid(out.float()) for _, out in
           common.forward_batches(model, x, pool[:n], args.batch_size, device, args.amp, view=corrupt)]
    rows = [[c[0].cpu().numpy(), i[0].cpu().numpy(), r[0].cpu().numpy()]  # per image: clean, D(x), reconstruction
            for (inp, clean), rec_b in zip(shown, rec) for i, c, r in zip(inp, clean, rec_b)]
    common.save_panel(run.path("ssl_panel.png"), rows, 3, ["clean (target)", "D(x) (input)", "reconstruction"])


def write_clusters(run, data, train_ids, clusters, per_row=6):
    """clusters.csv (every pool sample's cluster, rank and distance) and clusters.png (best-ranked per cluster)."""
    labels, rank, dist = clusters
    if os.path.isfile(run.path("clusters.csv")):
        os.remove(run.path("clusters.csv"))
    run.append_csv("clusters.csv", [{"sample_id": data.ids[i], "cluster": int(c), "rank": int(r), "distance": float(d)}
                                    for i, c, r, d in zip(train_ids, labels, rank, dist)])
    rows = []
    for c in range(labels.max() + 1):
        members = np.flatnonzero(labels == c)
        best = train_ids[members[np.argsort(rank[members])][:per_row]]
        rows.append([data.x[i] for i in best] + [np.zeros_like(data.x[0])] * (per_row - len(best)))
    common.save_panel(run.path("clusters.png"), rows, per_row, [f"rank {r}" for r in range(per_row)])


def panel(run, model, data, x, ids, args, device, n=4):
    """Image / ground truth / prediction / uncertainty (binary entropy of the prediction)."""
    ids = np.asarray(ids)[:n]
    p = common.predict(model, x, ids, args.batch_size, device, args.amp)
    h = common.binary_entropy(p)
    rows = [[data.x[i], data.y[i], (p[j] > 0.5).float().cpu().numpy(), h[j].cpu().numpy()] for j, i in enumerate(ids)]
    common.save_panel(run.path("panel.png"), rows, 4, ["image", "ground truth", "prediction", "entropy"])


# ----------------------------------------------------------------------------------------------------------
# Tables I and II (and the Fig. 2 comparison) from finished run folders: a view of common.collect_runs / summarise
# ----------------------------------------------------------------------------------------------------------
def tables(args):
    rows = [r for r in common.collect_runs(args.tables) if r["script"] == "ssl_coldstart"]
    if not rows:
        raise common.UserError(f"--tables {' '.join(args.tables)}: no ssl_coldstart run folder with a rounds.csv there")
    unfinished = sorted({r["run"] for r in rows if not r["finished"]})  # no summary.json: its last round is no result
    rows = [r for r in rows if r["finished"]]
    if not rows:
        raise common.UserError(f"--tables {' '.join(args.tables)}: no finished ssl_coldstart runs there ("
                               f"{len(unfinished)} unfinished: no readable summary.json, still running or stopped); "
                               "expected runs that ended")
    for r in rows:
        r["method"], r["init"], r["start"] = method(r), "w/ SSL" if r["ssl_init"] else "w/o SSL", r["cold_start"]
        auto = "cluster" if r["strategy"] == "cluster" else "random"  # --cold-start auto
        if r["cold_start"] != auto:   # e.g. random queries after a clustered base set: a method of its own
            r["method"] += f", {r['cold_start']} base set"
        r["schedule"] = f"{int(r['epochs_initial'])}+{int(r['epochs'])} epochs"
        for flag, default in (("channels", 1), ("up", "transpose"), ("ssl_optim", "adam")):
            r.setdefault(flag, default)  # runs of older versions lack these flags; they copied the head:
        r["transfer_head"] = bool(r.get("transfer_head", True) and r["ssl_init"])
    if len({r["schedule"] for r in rows}) > 1:  # runs with other epochs are never pooled: the schedule shows
        for r in rows:
            r["method"] += f", {r['schedule']}"
    for flag, name in (("channels", lambda v: f"{v} ch"), ("up", str), ("transfer_head", lambda v: "head copied"
                       if v else "head random"), ("ssl_optim", lambda v: f"SSL {v}")):
        if len({r[flag] for r in rows}) > 1:  # likewise any other setting that differs between the runs
            for r in rows:
                r["method"] += f", {name(r[flag])}"
    last = {}
    for r in rows:
        last[r["run"]] = max(last.get(r["run"], 0), r["round"])
    out = []
    for data in sorted({r["data"] for r in rows}):
        d = [r for r in rows if r["data"] == data]
        out.append(f"## {data}\n")
        # Table I: random vs clustering (at the default k and AAP, Sec. IV-A), with / without SSL weights
        t1 = [r for r in d if r["strategy"] in ("random", "cluster")]
        row = DEFAULTS.get(data, DEFAULTS["other"])
        t1_default = [r for r in t1 if r["strategy"] == "random" or (r["clusters"], r["aap_grid"]) ==
                      (row["clusters"], row["aap_grid"])]
        paper = (PAPER_TABLE_I_COLS, PAPER_TABLE_I) if data == "isic2017" else None
        out += [f"Table I: test Dice (mean ± std over seeds) per labelled count, {data}\n",
                pivot(common.summarise(t1_default, ("labeled", "method", "init")), "labeled", ("method", "init"),
                      "labelled", paper), ""]
        # Table II: per iteration, every k x AAP dimension (the paper: without SSL weights)
        for init in sorted({r["init"] for r in t1}):
            t2 = [r for r in t1 if r["init"] == init]
            paper = (PAPER_TABLE_II_COLS, PAPER_TABLE_II) if data == "isic2017" and init == "w/o SSL" else None
            out += [f"Table II: test Dice per iteration (0 = base set), segmentation {init}, {data}\n",
                    pivot(common.summarise(t2, ("round", "method")), "round", ("method",), "iter", paper), ""]
        # Fig. 2: every strategy after its last iteration
        f2 = [r for r in d if r["round"] == last[r["run"]]]
        out += [f"Fig. 2: test Dice after the last iteration, {data}\n",
                common.markdown_table(common.summarise(f2, ("method", "init", "start", "labeled")),
                                      ["method", "init", "start", "labeled", "n", "dice_mean"],
                                      ["method", "segmentation", "base set", "labelled", "runs", "test Dice"]), ""]
    if unfinished:
        out.append(f"({len(unfinished)} unfinished run(s) left out: no readable summary.json, still running or "
                   "stopped)\n")
    text = "\n".join(out)
    print(text)
    path = os.path.join(common.out_folder(args.out, "ssl_coldstart_tables.md"), "ssl_coldstart_tables.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"done: tables from {len({r['run'] for r in rows})} runs; {path}")
    return path


def pivot(summary, row_key, col_keys, row_header, paper=None):
    """Wide table from common.summarise rows: one row per row_key value, one column per col_keys value (its
    number of runs in the header); paper = (names, {row: values}) adds the paper's columns where rows match."""
    cols, wide = {}, {}
    for s in summary:
        name = ", ".join(str(s[k]) for k in col_keys)
        cols[name] = max(cols.get(name, 0), s["n"])
        w = wide.setdefault(s[row_key], {row_header: s[row_key], "n": 0})
        w[name], w[name + "_std"], w["n"] = s["dice_mean"], s["dice_mean_std"], max(w["n"], s["n"])
    names, headers = sorted(cols), [f"{c} (n={cols[c]})" for c in sorted(cols)]
    if paper is not None:
        for k, w in wide.items():
            w.update({"paper: " + c: v for c, v in zip(paper[0], paper[1].get(k, ()))})
        names, headers = names + ["paper: " + c for c in paper[0]], headers + ["paper: " + c for c in paper[0]]
    return common.markdown_table([wide[k] for k in sorted(wide)], [row_header] + names, [row_header] + headers)


if __name__ == "__main__":
    common.run_main(main)
