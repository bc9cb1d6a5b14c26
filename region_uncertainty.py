"""Combining Image and Region Uncertainty-based Active Learning for Melanoma Segmentation (N. Martin,
J.-P. Chevallet, P. Mulhem, G. Quenot; CBMI 2024; papers/region_uncertainty.md).

Images are ranked by the sum over their pixels of an uncertainty (least confidence, entropy or the MC-dropout
standard deviation) and the most uncertain are sent to the oracle; with --partial the oracle labels only the
uncertain pixels (|0.5 - y| < tau_u) of those images and the model's own prediction, binarised at tau_b,
labels the rest. Test Dice: Eq. 4 per image, averaged over the test set (common.dice_iou).

  python region_uncertainty.py                                   # synthetic data, CPU, about 2 minutes
  python region_uncertainty.py --partial --tau-u 0.25 --tau-b 0.25   # Sec. V-B: partial annotation
  python region_uncertainty.py --data isic2018 --data-dir ~/data/isic2018 --strategy entropy  # Table I (GPU)

--tables RUNS prints Tables I and II from finished runs.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import oracle
from unet import ResNetUNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # Sec. IV-D, footnote 5

# Defaults per dataset. The paper's numbers for ISIC 2018 (Sec. IV-A, IV-D, V); where it is silent, the
# choice is said next to it.
DEFAULTS = {
    "isic2018": dict(split=[2594, 100, 1000],  # Sec. IV-A: the official Task 1 training / validation / test sets
                     image_size=512,           # Sec. IV-D
                     batch_size=32,            # Sec. IV-D
                     initial=128,              # Sec. IV-D: cold start, 128 random fully annotated images
                     query=32,                 # Sec. IV-D: 32 per AL iteration (= the batch size, footnote 3)
                     rounds=40,                # Sec. IV-D: 40 AL iterations
                     rounds_partial=20,        # Sec. V-B: partial annotation runs stop at 20 iterations
                     epochs_initial=10,        # paper silent on the cold start; 10 like every iteration
                     epochs=10,                # Sec. IV-D: 10 epochs per AL iteration; Sec. IV-E: fine-tuned
                     lr=0.01, momentum=0.9, weight_decay=1e-4,  # Sec. IV-D: SGD
                     width=64,                 # Sec. IV-C: ResNet-18 (64 ... 512 channels)
                     mc_passes=20,             # paper silent on N (Eq. 3); 20 as in the CEAL reference code of [24]
                     full_steps=8140),         # Sec. V-A: the full baseline's iterations (below)
    # CPU-sized protocol: about two minutes on 2 cores. The paper's shape, scaled down.
    # epochs_initial 40: from a random initialisation, 10 epochs of 2 batches leave the cold-start model at
    # the empty prediction (measured), so the first query would be blind; the paper starts from ImageNet weights.
    "synthetic": dict(split=[300, 50, 100], image_size=64, batch_size=16, initial=32, query=16, rounds=8,
                      rounds_partial=8, epochs_initial=40, epochs=10, lr=0.01, momentum=0.9, weight_decay=1e-4,
                      width=16, mc_passes=10, full_steps=0),  # full_steps 0: the AL run's own steps
    # Any other dataset: the ISIC 2018 protocol; split sizes from the data (common.default_split), the cold
    # start and the query size the ISIC 2018 shares of the pool (128 and 32 of 2594: common.pool_share).
    "other": dict(split=None, image_size=512, batch_size=32, initial=None, query=None, rounds=40, rounds_partial=20,
                  epochs_initial=10, epochs=10, lr=0.01, momentum=0.9, weight_decay=1e-4, width=64, mc_passes=20,
                  full_steps=0),  # paper silent off ISIC 2018: the full baseline gets the AL run's own steps
}
# full_steps, Sec. V-A: "the same number of iterations as for 40 AL iterations was used: 8140". The AL run of the
# isic2018 defaults counts 9840 (128 + 32 r images, 10 epochs each at batch 32, r = 0..40; 8140 is r = 0..36), so
# the paper's number is that row's default; --full-steps 0 gives the AL run's count (common.ceiling).
STRATEGIES = ["least-confidence", "entropy", "mc-dropout", "random", "full"]
UNLABELLED = 255  # training-target value of a pixel nobody has labelled (masks are 0/1)
LOSSES = {"bce+dice": common.bce_dice_loss, "dice": common.soft_dice_loss,  # --loss (paper silent)
          "bce": lambda o, t: F.binary_cross_entropy_with_logits(o.float().squeeze(1), t.float())}

# Paper numbers (Dice as a fraction) for the tables and summary.json.
PAPER_TABLE1 = {"random": (0.87, 0.85), "full": (0.84, 0.83), "least-confidence": (0.88, 0.87),  # (val, test)
                "entropy": (0.87, 0.86), "mc-dropout": (0.86, 0.85)}
PAPER_TABLE2 = {(0.125, 0.25): (0.80, 2, 12), (0.125, 0.5): (0.81, 5, 11), (0.125, 0.75): (0.81, 3, 11),  # Dice,
                (0.25, 0.25): (0.84, 5, 19), (0.25, 0.5): (0.83, 6, 18), (0.25, 0.75): (0.83, 5, 18),  # % positive,
                (0.375, 0.25): (0.84, 9, 32), (0.375, 0.5): (0.82, 9, 32), (0.375, 0.75): (0.82, 10, 32),  # % verify
                "full": (0.83, 21, 100)}


def parse_args(argv=None):
    p = common.shared_parser(__doc__, STRATEGIES, DEFAULTS)
    # Region-uncertainty flags
    p.add_argument("--entropy", default="printed", choices=["printed", "two-term"],
                   help="Eq. 2 as printed, -y log2 y (default), or the two-term binary entropy")
    p.add_argument("--mc-passes", type=int, help="N dropout passes of Eq. 3; default per --data: isic2018 20, "
                   "synthetic 10, other 20 (paper silent; 20 in the CEAL reference code of [24])")
    p.add_argument("--dropout", type=float, help="dropout on the bottleneck (layer4's output, before its 1x1 "
                   "convolution + BatchNorm), which MC dropout samples; default 0.5 with --strategy mc-dropout (paper "
                   "silent; the CEAL reference code of [24] uses 0.5 there), 0 for every other strategy (the paper's "
                   "network has none)")
    p.add_argument("--partial", action="store_true", help="Sec. III-B: the oracle labels only the uncertain pixels "
                   "of a queried image, the binarised prediction the rest (--rounds then defaults to 20 on isic2018 "
                   "and other data, 8 on synthetic)")
    p.add_argument("--tau-u", type=float, default=0.25, help="uncertainty threshold: a pixel is uncertain where "
                   "|0.5 - y| < tau_u (Sec. III-B; the paper tries 0.125, 0.25, 0.375; default 0.25)")
    p.add_argument("--tau-b", type=float, default=0.5, help="binarisation threshold of the model's labels "
                   "(Sec. III-B; the paper tries 0.25, 0.5, 0.75; default 0.5)")
    p.add_argument("--encoder-weights", metavar="PATH", help="local torchvision resnet18 state dict (ImageNet "
                   "weights, as the paper uses); fc.* is ignored; needs --width 64 (default: random initialisation)")
    p.add_argument("--momentum", type=float, help="SGD momentum; default 0.9 on every --data (Sec. IV-D)")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay; default 1e-4 on every --data (Sec. IV-D)")
    p.add_argument("--loss", default="bce+dice", choices=["bce+dice", "bce", "dice"],
                   help="paper silent (default: bce+dice)")
    p.add_argument("--no-augment", action="store_true", help="switch off the Sec. IV-D augmentation")
    p.add_argument("--full-steps", type=int, help="--strategy full: optimiser steps, or 0 for as many as the AL run "
                   "of the other flags takes; default per --data: isic2018 8140 (Sec. V-A: fixed, whatever --rounds, "
                   "--epochs or --batch-size), others 0")
    p.add_argument("--tables", nargs="+", metavar="RUN_DIR", help="print Tables I and II from finished runs under "
                   "these folders and exit (no training)")
    args = p.parse_args(argv)
    if args.partial and args.rounds is None:  # Sec. V-B: 20 iterations with partial annotation
        args.rounds = DEFAULTS.get(args.data, DEFAULTS["other"])["rounds_partial"]
    # the ResNet-18 U-Net: a multiple of 32, at least 64 (its last stage, at 1/32, keeps more than one pixel for
    # BatchNorm)
    args = common.resolve(args, DEFAULTS, size=(32, 64), weight_decay=0, full_steps=0)
    del args.rounds_partial
    if args.dropout is None:  # only MC dropout needs dropout; trained into the others it shifts BatchNorm (docs)
        args.dropout = 0.5 if args.strategy == "mc-dropout" else 0.0
    if args.tables:
        return args
    if not 0 <= args.dropout < 1:
        raise common.UserError(f"--dropout {args.dropout}: expected a value in [0, 1)")
    common.check_mc_dropout(args, "mc-dropout")
    if args.partial and args.strategy == "full":
        raise common.UserError("--partial needs an active-learning strategy, not --strategy full")
    if not 0 < args.tau_u <= 0.5:
        raise common.UserError(f"--tau-u {args.tau_u}: expected a value in (0, 0.5]")
    if not 0 < args.tau_b < 1:
        raise common.UserError(f"--tau-b {args.tau_b}: expected a value in (0, 1)")
    if not 0 <= args.momentum < 1:  # at 1 or above SGD's velocity never decays
        raise common.UserError(f"--momentum {args.momentum}: expected a value in [0, 1)")
    if args.encoder_weights and args.width != 64:
        raise common.UserError(f"--encoder-weights needs --width 64 (ResNet-18 itself), not --width {args.width}")
    return args


# ---- Sec. III-A: pixel uncertainties, summed over the image ----
def least_confidence(p):
    """Eq. 1, |0.5 - y| per pixel, summed: the LOWEST sums are the least confident images (queried first)."""
    return (0.5 - p.float()).abs().flatten(1).sum(1)


def entropy(p, two_term=False):
    """Eq. 2, -y log2 y per pixel as printed (two_term adds -(1 - y) log2(1 - y)), summed: highest queried."""
    return common.entropy_scores(p, two_term=two_term, reduce="sum")


def mc_dropout_std(var):
    """Eq. 3, the standard deviation over N dropout passes per pixel (from their variance), summed: highest
    queried."""
    return var.float().clamp(min=0).sqrt().flatten(1).sum(1)


def score_pool(model, x, pool, args, device):
    """Image scores of the pool, as the paper defines them (Eqs. 1-3, summed over pixels)."""
    scores = []
    if args.strategy == "mc-dropout":
        for _, _, var in common.mc_dropout(model, x, pool, args.mc_passes, args.batch_size, device, args.amp):
            scores.append(mc_dropout_std(var))
    else:
        for _, p in common.predict_batches(model, x, pool, args.batch_size, device, args.amp):
            scores.append(least_confidence(p) if args.strategy == "least-confidence" else
                          entropy(p, args.entropy == "two-term"))
    return torch.cat(scores).cpu().numpy() if scores else np.zeros(0)


def query(pool, scores, k, strategy, rng=None):
    """The k most uncertain pool images: the LOWEST sums of |0.5 - y| (least confidence), the highest sums of
    entropy or of MC-dropout standard deviation. Exact ties (e.g. saturated predictions) in an order drawn from
    rng (the run's seeded query generator), not by pool position."""
    return common.top_k(pool, scores, k, largest=strategy != "least-confidence", rng=rng)


# ---- Sec. III-B: partial annotation ----
def partial_annotation(p, gt, tau_u, tau_b):
    """Steps 2a-2c: pixels with |0.5 - y| < tau_u are uncertain and take the oracle's label; the others take the
    prediction binarised at tau_b (y > tau_b). Returns the training target (uint8) and the uncertain mask."""
    uncertain = (0.5 - p.float()).abs() < tau_u                  # 2a
    model_label = p.float() > tau_b                              # 2b
    return torch.where(uncertain, gt > 0, model_label).to(torch.uint8), uncertain  # 2c


def annotation_percentages(uncertain, gt):
    """Table II / Fig. 5 over the images annotated in one iteration: % of all their pixels that the expert
    annotates as positive (uncertain and lesion), and % of pixels to verify (uncertain)."""
    n = max(1, uncertain.numel())
    return (100.0 * float((uncertain & (gt > 0)).sum()) / n, 100.0 * float(uncertain.sum()) / n)


# ---- Sec. IV-D: augmentation on device batches ----
def make_augment(rotation=30.0, flip=0.5, jitter=0.2, blur_sigma=(0.01, 0.2), blur_kernel=5):
    """Random rotation +-rotation degrees (Sec. IV-D's "+-30%" read as degrees, as torchvision's
    RandomRotation(30)), horizontal and vertical flips (each with probability flip), colour jitter of brightness,
    contrast and saturation by +-jitter, Gaussian blur with sigma ~ U(blur_sigma) and a blur_kernel x blur_kernel
    kernel. Images are floats in [0, 1] (B, 3, H, W); masks (B, H, W) follow the same geometry with
    nearest-neighbour sampling; outside the rotated image both are 0 (torchvision's fill). The image is resampled
    bilinearly (paper silent; RandomRotation's default is nearest). ImageNet normalisation comes after, inside the
    model (ResNetUNet mean/std)."""

    def augment(xb, yb):
        B, dev = len(xb), xb.device
        u = lambda: torch.rand(B, device=dev)
        # rotation and both flips in one affine grid: output pixel -> source pixel, exact for the flips
        a = (u() * 2 - 1) * math.radians(rotation)
        fx = torch.where(u() < flip, -1.0, 1.0)
        fy = torch.where(u() < flip, -1.0, 1.0)
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos * fx, -sin * fy, zero], 1),
                             torch.stack([sin * fx, cos * fy, zero], 1)], 1)
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        xb = F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        yb = F.grid_sample(yb[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].to(yb.dtype)
        # colour jitter (torchvision's ColorJitter formulas; fixed order brightness, contrast, saturation)
        if jitter > 0 and xb.shape[1] == 3:
            f = lambda: (1 + (u() * 2 - 1) * jitter).view(B, 1, 1, 1)
            gray = lambda im: (0.299 * im[:, 0] + 0.587 * im[:, 1] + 0.114 * im[:, 2])[:, None]
            xb = (xb * f()).clamp(0, 1)                                   # brightness
            xb = _blend(xb, gray(xb).mean((2, 3), keepdim=True), f())  # contrast
            xb = _blend(xb, gray(xb), f())                                # saturation
        # Gaussian blur, one sigma per image, reflect padding (torchvision's gaussian_blur)
        if blur_kernel > 1:
            sigma = blur_sigma[0] + u() * (blur_sigma[1] - blur_sigma[0])
            r = torch.arange(blur_kernel, device=dev, dtype=torch.float32) - (blur_kernel - 1) / 2
            k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None] ** 2))
            k = (k / k.sum(1, keepdim=True)).repeat_interleave(xb.shape[1], 0)  # (B*C, K)
            h = xb.reshape(1, -1, *xb.shape[2:])
            pad = blur_kernel // 2
            h = F.conv2d(F.pad(h, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=h.shape[1])
            h = F.conv2d(F.pad(h, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=h.shape[1])
            xb = h.reshape(xb.shape)
        return xb, yb

    return augment


def _blend(img, other, factor):
    """torchvision's _blend: factor * img + (1 - factor) * other, clamped to [0, 1]."""
    return (factor * img + (1 - factor) * other).clamp(0, 1)


def build_model(args, device):
    """The ResNet-18 U-Net (Sec. IV-C), ImageNet-pre-trained with --encoder-weights (the paper's). Departure:
    randomly initialised without it (the default), since nothing is downloaded here."""
    model = ResNetUNet(3, 1, args.width, dropout=args.dropout, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if args.encoder_weights:
        try:
            state = torch.load(args.encoder_weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise common.UserError(f"--encoder-weights {args.encoder_weights}: file not found")
        except Exception as e:  # not a torch file, or one holding more than tensors (e.g. a run's checkpoint.pt)
            raise common.UserError(f"--encoder-weights {args.encoder_weights}: torch.load refused it "
                                   f"({type(e).__name__}: not a file of tensors only); expected torchvision's "
                                   f"ResNet-18 state dict (resnet18-f37072fd.pth)")
        try:
            model.load_torchvision_resnet18(state)
        except Exception as e:
            raise common.UserError(f"--encoder-weights {args.encoder_weights}: {e}")
        print(f"encoder: ResNet-18 weights from {args.encoder_weights}")
    return common.prepare_model(model, device, args.compile)


def annotate(run, rnd, model, data, x, y, new, partial, args, device):
    """The oracle's step for the images queried this round (oracle.ask: the dataset's masks, or a
    person's through files). Full annotation: the oracle labels every pixel. With partial (Sec. III-B, Steps
    2a-2c): the oracle labels the uncertain pixels, the model's prediction binarised at tau_b the rest.
    Returns their training targets and the row's annotation numbers: % of pixels annotated positive and % to
    verify (Table II, Fig. 5), and the Dice of the targets."""
    p = common.predict(model, x, new, args.batch_size, device, args.amp) if partial else None
    decide = ((0.5 - p.float()).abs() < args.tau_u).cpu().numpy() if partial else None  # 2a, for the person
    oracle.ask(run, rnd, new, data, y, model, x, args.batch_size, device, args.amp, decide)
    gt = y[torch.as_tensor(new, device=device)]
    if partial:  # Sec. III-B: oracle on the uncertain pixels, the model on the rest
        t, uncertain = partial_annotation(p, gt, args.tau_u, args.tau_b)
        pct_positive, pct_verify = annotation_percentages(uncertain, gt)
        target_dice = float(common.dice_iou(t, gt)[0].mean())  # how good the mixed labels are
        return t, {"pct_positive": pct_positive, "pct_verify": pct_verify, "target_dice": target_dice}
    # the oracle annotates every pixel
    return gt, {"pct_positive": 100.0 * float((gt > 0).float().mean()), "pct_verify": 100.0, "target_dice": 1.0}


def restore_targets(target, y, labeled, partial_ids, partial_masks, device):
    """--resume: the training targets of the labelled images, the oracle's masks and, for the partially
    annotated images (Sec. III-B), the saved oracle + model masks."""
    oracle_ids = torch.as_tensor(np.setdiff1d(labeled, partial_ids), device=device)
    target[oracle_ids] = y[oracle_ids]
    target[torch.as_tensor(partial_ids, device=device)] = partial_masks.to(device)


def summary(run, args):
    """summary.json's entries beyond the shared ones, and the end of the last line: the last validation Dice, the
    step count, Table II's mean percentages over the AL iterations, and the paper's test Dice for this setting
    (Table I, or Table II with --partial)."""
    rows = run.read_csv("rounds.csv")
    paper = PAPER_TABLE2.get((args.tau_u, args.tau_b)) if args.partial else PAPER_TABLE1.get(args.strategy)
    return ({"final_val_dice": float(rows[-1]["val_dice"]), "steps": int(rows[-1]["steps"]),
             "mean_pct_positive": float(np.mean([float(r["pct_positive"]) for r in (rows[1:] or rows)])),  # Table II
             "mean_pct_verify": float(np.mean([float(r["pct_verify"]) for r in (rows[1:] or rows)])),
             "paper_test_dice": None if args.data != "isic2018" or paper is None else paper[0 if args.partial else 1]},
            f" (val {float(rows[-1]['val_dice']):.4f})")


def main(argv=None):
    args = parse_args(argv)
    if args.tables:
        return print_tables(args.tables)
    run, device = common.Run.start(__file__, args, parse_args)

    # ---- data: official layout -> uint8 cache -> seeded split, all of it on the device as uint8 ----
    data = common.load_data(args.data, args.data_dir, args.image_size, 3, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    # other data: the ISIC 2018 shares, 128 cold-start images and 32 per iteration of the 2594 pool (Sec. IV-D)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 128, 32, 2594)
    common.check_budget(len(train_ids), args.initial, args.query, args.rounds)
    rounds, epochs0, steps = common.ceiling(args, len(train_ids), steps=args.full_steps)  # Sec. V-A: --full-steps
    x, y = common.to_device(data, device)
    # The training target, written when a sample is labelled: the oracle's mask, or with --partial oracle + model
    # (Sec. III-B). Unlabelled samples hold UNLABELLED, never a copy of the ground truth, so a target that was not
    # written is caught before training (below) instead of silently being the ground truth.
    target = torch.full_like(y, UNLABELLED)

    model = build_model(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    loss_fn, augment = LOSSES[args.loss], None if args.no_augment else make_augment()
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)  # queries; batch order
    n0 = len(train_ids) if args.strategy == "full" else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)  # Sec. IV-D: random cold start
    pool = np.setdiff1d(train_ids, labeled)
    partial_ids, steps_done = np.zeros(0, np.int64), 0  # images whose target is part oracle, part model; steps so far
    start, state = run.resume(model, opt, rng, gen)
    oracle.restore(run, start, data, y)  # --oracle folder: the person's labels of the finished rounds
    if state:
        labeled, pool, partial_ids, steps_done = state["labeled"], state["pool"], state["partial_ids"], state["steps"]
        restore_targets(target, y, labeled, partial_ids, state["partial_masks"], device)
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, scored=args.strategy not in ("random", "full")))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        # ---- selection (Sec. III-A) and annotation (Sec. III-B) ----
        t0, scores, score_of = time.time(), {}, None  # random (and the cold start) use no score
        if rnd > 0:  # the query rule: the only part that differs from a random baseline
            if args.strategy == "random":
                new = common.query_random(pool, args.query, rng)
            else:
                scores = {"score": score_pool(model, x, pool, args, device)}
                new = query(pool, scores["score"], args.query, args.strategy, rng)
                score_of = dict(zip(pool.tolist(), scores["score"]))
            how = f"oracle-{args.strategy}" + ("-partial" if args.partial else "")
            # every pool image of this round, its score and whether it was picked: the rule checked from the folder
            run.log_pool_scores(rnd, [data.ids[i] for i in pool], scores, {how: [data.ids[i] for i in new]})
            labeled, pool = np.concatenate([labeled, new]), np.setdiff1d(pool, new)
        else:  # the random cold start (or, for the full baseline, the whole training set)
            new, how = labeled, "full" if args.strategy == "full" else "initial"
        queried = {how: [data.ids[i] for i in new]}
        # picks/round_<rnd>.png: what the rule asked for (with --partial: the images the oracle partly annotates)
        common.save_picks(run, rnd, model, data, x, {how: new}, score_of, args.batch_size, device, args.amp)
        select_s = time.time() - t0
        target[torch.as_tensor(new, device=device)], annotation = annotate(run, rnd, model, data, x, y, new,
                                                                           rnd > 0 and args.partial, args, device)
        t0 = time.time()
        partial_ids = np.concatenate([partial_ids, new]) if rnd > 0 and args.partial else partial_ids
        if bool((target[torch.as_tensor(labeled, device=device)] == UNLABELLED).any()):
            raise RuntimeError(f"round {rnd}: a labelled image has no training target (a bug, not your input)")

        # ---- training: fine-tune on all labelled images, 10 epochs per iteration (Sec. IV-D, V-A) ----
        epochs = epochs0 if rnd == 0 else args.epochs

        for e, loss, _ in common.train_epochs(model, opt, x, target, labeled, epochs, args.batch_size, device=device,
                                              amp=args.amp, loss_fn=loss_fn, augment=augment, generator=gen,
                                              steps=steps):
            progress.epoch(rnd, e, epochs, loss)
        steps_done += steps or epochs * math.ceil(len(labeled) / args.batch_size)
        train_s = time.time() - t0

        # ---- validation (100 images, every iteration) and test Dice; the round is written first ----
        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        val_dice, _ = common.evaluate(model, x, y, val_ids, args.batch_size, device, args.amp)
        val_mean, val_std = common.mean_std(val_dice)
        row = common.round_row(rnd, len(labeled), len(partial_ids), dice, iou, train_s, select_s, val_dice=val_mean,
                               val_dice_std=val_std, **annotation, steps=steps_done)
        figures(run, run.end_round(row, queried, progress, model, opt, rng, gen, labeled=labeled, pool=pool,
                                   partial_ids=partial_ids, steps=steps_done,
                                   partial_masks=target[torch.as_tensor(partial_ids, device=device)].cpu()))

    oracle.predict_rest(run, model, data, x, np.setdiff1d(train_ids, labeled), args.batch_size, device, args.amp)
    panel(run, model, data, x, y, pool if len(pool) else test_ids, args, device)
    return run.finish(*summary(run, args))


def figures(run, rows):
    """Fig. 4 (Dice against annotated images, validation and test) and Fig. 5 (Dice and the percentages of
    pixels to annotate positive / to verify, per iteration)."""
    r = [int(v["round"]) for v in rows]
    n = [int(v["labeled"]) for v in rows]
    col = lambda k, s=1.0: [float(v[k]) * s for v in rows]
    common.plot(run.path("dice_curve.png"), {"validation": (n, col("val_dice")), "test": (n, col("dice_mean"))},
                "annotated images", "Dice", f"{run.args.strategy} on {run.args.data} (Fig. 4)")
    common.plot(run.path("annotation.png"), {"test Dice %": (r, col("dice_mean", 100)),
                                             "validation Dice %": (r, col("val_dice", 100)),
                                             "% annotated positive": (r, col("pct_positive")),
                                             "% to verify": (r, col("pct_verify"))},
                "AL iteration", "%", f"tau_u {run.args.tau_u}, tau_b {run.args.tau_b}" +
                ("" if run.args.partial else " (full annotation)") + " (Fig. 5)")


@torch.inference_mode()
def panel(run, model, data, x, y, ids, args, device, n=4):
    """Image / ground truth / prediction / uncertainty (0.5 - |0.5 - y|) / pixels to annotate (|0.5 - y| <
    tau_u) / the partial-annotation target those would give (Fig. 2)."""
    ids = np.asarray(ids)[:n]
    p = common.predict(model, x, ids, args.batch_size, device, args.amp)
    t, uncertain = partial_annotation(p, y[torch.as_tensor(ids, device=device)], args.tau_u, args.tau_b)
    rows = [[data.x[i], data.y[i], (p[j] > 0.5).float().cpu().numpy(), (0.5 - (0.5 - p[j]).abs()).cpu().numpy(),
             uncertain[j].float().cpu().numpy(), t[j].float().cpu().numpy()] for j, i in enumerate(ids)]
    common.save_panel(run.path("panel.png"), rows, 6, ["image", "ground truth", "prediction", "uncertainty",
                                                       "to annotate", "partial target"])


def print_tables(paths):
    """Table I (image-level selection, full annotation) and Table II (partial annotation over tau_u x tau_b),
    from the finished run folders under `paths`: Dice at the last iteration, mean +- std over runs (seeds); the
    percentages are each run's mean over its AL iterations (rounds >= 1; the full baseline: its one round),
    then mean +- std over runs. Runs are
    grouped by protocol (initial + query x rounds, image size) so that different budgets never mix."""
    rows = [r for r in common.collect_runs(paths) if r["script"] == "region_uncertainty"]
    last = {}
    for r in rows:
        if r["round"] >= last.get(r["run"], {"round": -1})["round"]:
            last[r["run"]] = r
    final = [r for r in last.values() if r["strategy"] == "full" or r["round"] == r["rounds"]]
    if not final:
        raise common.UserError(f"--tables {' '.join(paths)}: no finished region_uncertainty runs (rounds.csv) there")
    finished = {r["run"] for r in final}
    rows = [r for r in rows if r["run"] in finished]
    for r in rows:
        two_term = r["strategy"] == "entropy" and r.get("entropy") == "two-term"
        r["method"] = r["strategy"] + (" (two-term)" if two_term else "")
        r["protocol"] = f"{r['initial']}+{r['query']}x{r['rounds']}, {r['image_size']}px"
    t1 = common.summarise([r for r in final if not r.get("partial")], ["data", "protocol", "method"],
                          ("labeled", "steps", "val_dice", "dice_mean"))
    for r in t1:
        val, test = PAPER_TABLE1.get(r["method"], ("-", "-")) if r["data"] == "isic2018" else ("-", "-")
        r.update(labeled=f"{r['labeled']:.0f}", steps=f"{r['steps']:.0f}", paper_val=val, paper_test=test)
    print("Table I: uncertainty estimation at image level (Dice at the last iteration)\n")
    print(common.markdown_table(t1, ["data", "protocol", "method", "n", "labeled", "steps", "val_dice", "dice_mean",
                                     "paper_val", "paper_test"],
                                ["data", "protocol", "method", "runs", "annotated images", "steps", "val Dice",
                                 "test Dice", "paper val", "paper test"]))
    keys = ["data", "protocol", "strategy", "tau_u", "tau_b"]
    dice = common.summarise([r for r in final if r.get("partial")], keys, ("dice_mean", "val_dice"))
    per_run = common.summarise([r for r in rows if r.get("partial") and r["round"] >= 1], keys + ["run"],
                               ("pct_positive", "pct_verify"))  # each run's mean over its iterations
    pct = {tuple(r[k] for k in keys): r for r in common.summarise(per_run, keys, ("pct_positive", "pct_verify"))}
    t2 = []
    for r in dice:
        q = pct.get(tuple(r[k] for k in keys), {})
        paper = PAPER_TABLE2.get((r["tau_u"], r["tau_b"]), ("-",) * 3) if r["data"] == "isic2018" else ("-",) * 3
        t2.append(dict(r, **{k: q[k] for k in ("pct_positive", "pct_positive_std", "pct_verify", "pct_verify_std")
                             if k in q},
                       tau_u=f"{r['tau_u']:g}", tau_b=f"{r['tau_b']:g}", paper_dice=paper[0], paper_pos=paper[1],
                       paper_verify=paper[2]))
    for r in common.summarise([r for r in final if r["strategy"] == "full"], ["data", "protocol"],
                              ("dice_mean", "val_dice", "pct_positive", "pct_verify")):
        paper = PAPER_TABLE2["full"] if r["data"] == "isic2018" else ("-",) * 3
        t2.append(dict(r, strategy="full dataset", tau_u="-", tau_b="-", paper_dice=paper[0], paper_pos=paper[1],
                       paper_verify=paper[2]))
    print("\nTable II: partial annotation, Dice and % of pixels annotated (mean over the AL iterations)\n")
    print(common.markdown_table(t2, ["data", "protocol", "strategy", "tau_u", "tau_b", "n", "dice_mean", "pct_positive",
                                     "pct_verify", "paper_dice", "paper_pos", "paper_verify"],
                                ["data", "protocol", "selection", "tau_u", "tau_b", "runs", "test Dice",
                                 "% annotated positive", "% to verify/annotate", "paper Dice", "paper % positive",
                                 "paper % verify"]))
    if len(last) > len(final):
        print(f"\n({len(last) - len(final)} unfinished run(s) left out)")


if __name__ == "__main__":
    common.run_main(main)
