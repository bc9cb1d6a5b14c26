"""Active Learning for Biomedical Image Segmentation (K. Jethaliya, Univ. at Buffalo; papers/ceal_mcdropout.md).

Cost-Effective Active Learning (CEAL) with Monte Carlo dropout: the per-pixel variance of T stochastic
predictions is an uncertainty map whose sum ranks the unlabelled pool; each iteration sends the least and
the most uncertain samples, and a random draw from the low-uncertainty band, to the oracle, and
pseudo-labels the most confident samples with the model's own prediction. Where the paper reads two ways,
the other reading is a flag (--band, --pseudo-pick, --pseudo-mode; the README's ceal_mcdropout.py section).

  python ceal_mcdropout.py                                           # synthetic data, CPU, about 2.5 minutes
  python ceal_mcdropout.py --data isic2017 --data-dir ~/data/isic2017 # the paper's ISIC 2017 protocol (GPU)
  python ceal_mcdropout.py --data lgg --data-dir ~/data/kaggle_3m     # the paper's LGG protocol (GPU)
"""
import os
import time

import numpy as np
import torch

import common
import oracle
from unet import UNet

# The paper's numbers (Tables 1-2, Sec. 1.2, 4-5); where it is silent, the public CEAL code (Gorriz et al.,
# github.com/marc-gorriz/CEAL-Medical-Image-Segmentation) or our choice, as said on each line.
ISIC = dict(split=[1600, 400, 600],  # Table 1: train 1600 (of the official 2000), val 400, official test 600
            initial=600,             # Table 1: 600 labelled / 1000 unlabelled
            query=35,                # Sec. 4.2: 10 lowest + 10 highest + 15 random from the low band
            rounds=10,               # paper silent: reference code nb_iterations = 10
            epochs_initial=20, epochs=5,  # Sec. 5: 20 epochs initial, 5 per iteration
            batch_size=32,           # paper silent: reference code fits with batch_size=32
            lr=1e-4,                 # paper silent: reference code Adam 1e-5 with Dice loss; 1e-4 with BCE+Dice here
            width=64,                # Sec. 1.2: about 31 M parameters
            image_size=256,          # paper silent: reference code 192x240; 256x256 keeps 2^4 poolings exact
            pseudo_step=20,          # Sec. 4.2: "20 x number of iterations" pseudo-labelled, read as 20 new a
                                     # round (--pseudo-mode total; the other readings are flags, see its help)
            mc_passes=20)            # paper silent ("t steps"): reference code nb_step_predictions = 20
# Paper silent on colour: RGB in [0, 1] here (the reference code reads grayscale, standardised by the data's
# mean and std); and on the test predictor: one forward pass, dropout off (common.evaluate; Sec. 1.1's dropout
# "while testing" is the MC sampling of Sec. 4.1), as in every script; and on the full-set baseline's training
# (Sec. 6: "some model trained completely on labeled data"): the AL run's optimiser steps (common.ceiling).
DEFAULTS = {
    "isic2017": ISIC,
    # Table 2: 1373 images, read as kaggle_3m's 1373 slices with tumour (of 3929); paper silent on how (Sec. 2: "20%
    # of this data is kept for testing"): by patient here, as PROTOCOLS asks; 256 px is the slices' own size
    "lgg": dict(ISIC, split=[878, 220, 275], initial=329),
    # CPU-sized protocol: 2 min 34 s on 2 idle cores (README, Tests). Same shape as the paper's, scaled down.
    "synthetic": dict(split=[300, 60, 100], initial=60, query=10, rounds=6, epochs_initial=20, epochs=5,
                      batch_size=16, lr=1e-3, width=16, image_size=64, pseudo_step=5, mc_passes=10),
    # Any other dataset: the ISIC protocol, the split from the data (common.default_split), the initial set,
    # query and pseudo-label step the ISIC shares of the pool (600, 35 and 20 of 1600: common.pool_share)
    "other": dict(ISIC, split=None, initial=None, query=None, pseudo_step=None),
}


def parse_args(argv=None):
    p = common.shared_parser(__doc__, ["ceal", "random", "full"], DEFAULTS)
    # CEAL flags: the readings of Sec. 4.2 (--pseudo-mode, --band, --pseudo-pick) in full in the README
    p.add_argument("--mc-passes", type=int, help="T, the MC-dropout passes of Sec. 4.1; default per --data: isic2017 "
                   "20, lgg 20, synthetic 10, other 20 (paper silent: reference code 20)")
    p.add_argument("--pseudo-step", type=int, help="the 20 of Sec. 4.2's \"20 x number of iterations\" "
                   "pseudo-labels; default per --data: isic2017 20, lgg 20, synthetic 5, other the ISIC share of "
                   "the pool (20 of 1600)")
    p.add_argument("--pseudo-mode", default="total", choices=["total", "redraw", "per-iteration"],
                   help="how the pseudo-labels add up (ceal_budget): total (default): pseudo_step new ones per "
                   "iteration, leaving the pool (Sec. 4.3); redraw: fresh pseudo_step x t each iteration, left in the "
                   "pool, as the reference code (which starts at iteration 5 with 20 x (t - 4)); per-iteration: "
                   "pseudo_step x t new ones at iteration t (ISIC needs --rounds 8)")
    p.add_argument("--band", default="paper", choices=["paper", "reference"],
                   help="group 3, the random low-uncertainty band (common.ceal_groups): paper (default): up to 6 of "
                   "80 histogram bins above the mode, mode bin included; reference: the reference code's bins mode + "
                   "6 to 47")
    p.add_argument("--pseudo-pick", default="nearest", choices=["nearest", "reference"],
                   help="group 4 (common.ceal_groups): nearest (default): closest to the centre of the histogram's "
                   "mode bin, so the paper's count is met; reference: the reference code's random draw inside the "
                   "mode bin (fewer when it holds fewer)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout probability (paper silent; reference code "
                   "uses 0.5 at the bottleneck only; 0.2 between the convolutions of every block here; default 0.2)")
    p.add_argument("--dropout-at", default="every", choices=["every", "bottleneck"],
                   help="every block (Sec. 1.2, default) or bottleneck only (the public CEAL code)")
    p.add_argument("--loss", default="bce+dice", choices=["bce+dice", "dice"],
                   help="paper silent; the reference code trains on soft Dice (default: bce+dice)")
    p.add_argument("--all-slices", action="store_true",
                   help="lgg: keep slices without tumour (the paper keeps the 1373 with tumour)")
    args = common.resolve(p.parse_args(argv), DEFAULTS)
    common.check_mc_dropout(args, "ceal")
    return args


def ceal_budget(args, n_train):
    """The budget of Sec. 4.2, said here when it does not fit the training pool: the pool then runs out before
    the last iteration, which gets fewer pseudo-labels and, when the earlier ones took too much of the pool,
    fewer queries too (ceal_groups serves the oracle first within an iteration; each such iteration prints
    its counts, ceal_query). Table 2's LGG is such a case, 329 + 35 x 10 + 20 x 10 = 879 of 878 slices.
    Returns pseudo_of(r): the pseudo-labels iteration r trains on, "20 x number of iterations" (--pseudo-mode)."""
    pseudo_of = lambda r: args.pseudo_step * (r * (r + 1) // 2 if args.pseudo_mode == "per-iteration" else r)
    n_pseudo = pseudo_of(args.rounds) if args.strategy == "ceal" else 0
    short = args.initial + args.query * args.rounds + n_pseudo - n_train
    if args.strategy == "ceal" and short > 0:
        print(f"note: {args.initial} + {args.query} x {args.rounds} oracle labels + {n_pseudo} pseudo-labels "
              f"({args.pseudo_mode}) exceed the training pool of {n_train} by {short}: the last iterations get "
              "fewer (each says how many)")
    return pseudo_of


def score_pool(model, x, y, pool, args, device):
    """MC dropout (Sec. 4.1): per-pixel variance over T passes, summed per image (the reference code weighs it by a
    distance transform of the prediction, apply_edt; the paper does not); also the mean prediction thresholded at
    0.5 (the pseudo-labels: paper silent, Sec. 4.3 says "predicted by the model"; the reference code labels with one
    plain forward, dropout off, its probabilities as soft targets) and, for Fig. 5 only, the Dice of that prediction
    against the hidden ground truth (nan where y is None: the pool has no masks, common.pool_truth)."""
    scores, masks = common.mc_variance(model, x, pool, args.mc_passes, args.batch_size, device, args.amp)
    if y is None or len(pool) == 0:
        return scores, masks, np.full(len(pool), np.nan)
    at = torch.as_tensor(pool, device=device)  # Fig. 5's Dice a batch at a time: no pool-sized float copies
    dice = [common.dice_iou(masks[b] > 0, y[at[b]] > 0)[0]
            for b in common.batches(torch.arange(len(pool), device=device), args.batch_size)]
    return scores, masks, torch.cat(dice).cpu().numpy()


def ceal_query(run, rnd, model, x, y, pool, args, rng, device):
    """Sec. 4.1-4.2: the pool scored with MC dropout and split into the four groups (Figs. 5-6 drawn). Returns
    the scores, the Dice of Fig. 5, the groups ({how: pool samples}: three to the oracle) and the pseudo masks."""
    scores, masks, pool_dice = score_pool(model, x, y, pool, args, device)
    n_low = n_high = round(args.query * 2 / 7)  # 35 -> 10 / 10 / 15 (Sec. 4.2)
    # group 4, "20 x number of iterations" (Sec. 4.2). Our reading (--pseudo-mode total): pseudo_step new a round,
    # leaving the pool (Sec. 4.3), so ISIC's 1000-sample pool lasts the 10 iterations (350 oracle + 200 pseudo)
    k4 = args.pseudo_step * (1 if args.pseudo_mode == "total" else rnd)
    g = common.ceal_groups(scores, n_low, n_high, args.query - n_low - n_high, k4, rng, band=args.band,
                           pseudo=args.pseudo_pick)  # Sec. 4.2: the four groups (positions into pool)
    if sum(map(len, g[:3])) < args.query or len(g[3]) < k4:  # the pool ran short (ceal_budget), or the mode bin
        print(f"iteration {rnd}: {sum(map(len, g[:3]))} of {args.query} queries to the oracle, {len(g[3])} of {k4} "
              f"new pseudo-labels (pool {len(pool)})")
    figures(run, rnd, scores, pool_dice, g)
    groups = dict(zip(["oracle-lowest", "oracle-highest", "oracle-band", "pseudo"], [pool[i] for i in g]))
    return scores, pool_dice, groups, masks[torch.as_tensor(g[3], device=device)]


def figures(run, rnd, scores, pool_dice, groups):
    """Fig. 6 (the uncertainty histogram, the four groups marked) and Fig. 5 (uncertainty vs Dice over the pool;
    not without the pool's masks), per round: figures/uncertainty_{hist,vs_dice}_round_<K>.png."""
    os.makedirs(run.path("figures"), exist_ok=True)
    marks = {name: scores[g] for name, g in zip(("lowest", "highest", "band", "pseudo"), groups)}
    common.plot_hist(run.path(f"figures/uncertainty_hist_round_{rnd}.png"), scores, 80,
                     "uncertainty (sum of pixel variances)", f"pool uncertainty, round {rnd}", marks=marks)
    if not np.isnan(pool_dice).all():
        series = {"pool": (scores, pool_dice), **{k: (scores[g], pool_dice[g]) for k, g in zip(marks, groups)}}
        common.plot(run.path(f"figures/uncertainty_vs_dice_round_{rnd}.png"), series, "uncertainty",
                    "Dice of the prediction", f"round {rnd}", kind="scatter")


def keep_positive(data):
    """Only samples whose mask is not empty at the files' own resolution (Data.positive, decided before
    resizing), so the same slices are kept at every --image-size: the CEAL paper's 1373 LGG slices with
    tumour, of which 34 would vanish at 32 px. Data without `positive` (synthetic) uses the masks it has."""
    pos = data.positive if data.positive is not None else data.y.reshape(len(data), -1).any(1)
    return data.subset(np.flatnonzero(pos))


def panel(run, model, data, x, ids, args, device, n=4):
    """Fig. 2: image / ground truth / prediction / uncertainty map for a few samples."""
    rows = [[data.x[i], data.y[i], (mean[j] > 0.5).float().cpu().numpy(), var[j].float().cpu().numpy()]
            for b, mean, var in common.mc_dropout(model, x, ids[:n], args.mc_passes, args.batch_size, device, args.amp)
            for j, i in enumerate(b.tolist())]
    common.save_panel(run.path("panel.png"), rows, 4, ["image", "ground truth", "prediction", "uncertainty"])


def main(argv=None):
    args = parse_args(argv)
    run, device = common.Run.start(__file__, args, parse_args)

    data = common.load_data(args.data, args.data_dir, args.image_size, 3, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    if args.data == "lgg" and not args.all_slices:
        data = keep_positive(data)  # Sec. 2's 1373 images, read as the slices with tumour (full-res masks)
    # other data: the ISIC shares, D^L 600 of the 1600 (37.5 %, Sec. 4), +35 per iteration and 20 pseudo (Sec. 4.2)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 600, 35, 1600, pseudo=20)
    common.check_budget(len(train_ids), args.initial, args.query, args.rounds)
    pseudo_of, redraw = ceal_budget(args, len(train_ids)), args.pseudo_mode == "redraw"
    rounds, epochs0, steps = common.ceiling(args, len(train_ids), pseudo_of, redraw)  # --strategy full: the ceiling
    x, y = common.to_device(data, device)

    # U-Net of Sec. 1.2; BatchNorm after every convolution is our choice (paper silent; the reference code has none)
    model = common.prepare_model(UNet(3, 1, args.width, dropout=args.dropout, dropout_at=args.dropout_at), device,
                                 args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)
    n0 = len(train_ids) if args.strategy == "full" else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)
    pool, pseudo = np.setdiff1d(train_ids, labeled), np.zeros(0, np.int64)
    start, state = run.resume(model, opt, rng, gen)
    oracle.restore(run, start, data, y)  # --oracle folder: the person's labels of the finished rounds
    if state:
        labeled, pool, pseudo = state["labeled"], state["pool"], state["pseudo"]
    target = common.training_target(y, labeled, pseudo, state["pseudo_masks"] if state else None)
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, scored=args.strategy == "ceal",
                                                         pseudo=pseudo_of if args.strategy == "ceal" else None,
                                                         redraw=redraw))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        t0, queried = time.time(), {}
        if rnd > 0:  # the query rule: the only part that differs from a random baseline
            if args.strategy == "ceal":  # Sec. 4.1-4.3; pool_dice: Fig. 5's Dice, never used to select
                scores, pool_dice, groups, masks = ceal_query(run, rnd, model, x, common.pool_truth(data, y), pool,
                                                              args, rng, device)
            else:  # random: pool_scores.csv keeps the same columns, the score left empty
                scores, new = [""] * len(pool), common.query_random(pool, args.query, rng)
                groups, masks, pool_dice = {"oracle-random": new}, None, scores  # same oracle budget, no pseudo-labels
            queried = {how: [data.ids[i] for i in g] for how, g in groups.items()}
            # the audit trail: every pool sample's score and whether it was picked; the picks as the model saw them
            run.log_pool_scores(rnd, [data.ids[i] for i in pool], {"uncertainty": scores, "dice": pool_dice}, queried)
            common.save_picks(run, rnd, model, data, x, groups,
                              dict(zip(pool.tolist(), scores)) if args.strategy == "ceal" else None,
                              args.batch_size, device, args.amp)
            new = np.concatenate([g for how, g in groups.items() if how != "pseudo"])
        else:  # round 0: the seeded random start (the whole pool for "full")
            queried["full" if args.strategy == "full" else "initial"] = [data.ids[i] for i in labeled]
        select_s = time.time() - t0
        oracle.ask(run, rnd, new if rnd > 0 else labeled, data, y, model, x, args.batch_size, device, args.amp)
        t0 = time.time()
        if rnd > 0:  # Sec. 4.3: the oracle's answers (a person's: --oracle folder) and the pseudo-labels join D^L
            labeled, pseudo, pool = common.add_labels(target, y, groups, masks, labeled, pseudo, pool, redraw=redraw)
        else:
            target = common.training_target(y, labeled)
        # 20 epochs initially, then 5 per iteration (Sec. 5), fine-tuning the same model (paper silent; Sec. 4.3:
        # "the model is again trained on D^L"; the reference code continues from its weights)
        epochs, vals = epochs0 if rnd == 0 else args.epochs, [np.nan]  # vals[-1]: the round's val_dice
        loss_fn = common.bce_dice_loss if args.loss == "bce+dice" else common.soft_dice_loss
        for e, loss, _ in common.train_epochs(model, opt, x, target, np.concatenate([labeled, pseudo]), epochs,
                                              args.batch_size, device=device, amp=args.amp, loss_fn=loss_fn,
                                              generator=gen, steps=steps):
            # Figs. 7-10: validation Dice per epoch
            vd = float(common.evaluate(model, x, y, val_ids, args.batch_size, device, args.amp)[0].mean()) if len(val_ids) else None
            vals.append(np.nan if vd is None else vd)
            progress.epoch(rnd, e, epochs, loss, val_dice=vd)
        train_s = time.time() - t0

        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        row = common.round_row(rnd, len(labeled), len(pseudo), dice, iou, train_s, select_s, val_dice=vals[-1],
                               oracle_queries=len(labeled) - n0, pool_left=len(pool))  # val_dice: the last epoch's
        run.end_round(row, queried, progress, model, opt, rng, gen, labeled=labeled, pool=pool, pseudo=pseudo,
                      pseudo_masks=target[torch.as_tensor(pseudo, device=device)].cpu())

    oracle.predict_rest(run, model, data, x, np.setdiff1d(train_ids, labeled), args.batch_size, device, args.amp)
    panel(run, model, data, x, pool if len(pool) else test_ids, args, device)
    return run.finish({"paper_dice": {"isic2017": 0.77, "lgg": 0.58}.get(args.data)})


if __name__ == "__main__":
    common.run_main(main)
