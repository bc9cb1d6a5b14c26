"""Active Learning for Biomedical Image Segmentation (K. Jethaliya, Univ. at Buffalo; papers/ceal_mcdropout.md).

Cost-Effective Active Learning (CEAL) with Monte Carlo dropout: the per-pixel variance of T stochastic
predictions is an uncertainty map whose sum ranks the unlabelled pool; each iteration sends the least and
the most uncertain samples, and a random draw from the low-uncertainty band, to the oracle, and
pseudo-labels the most confident samples with the model's own prediction. Where the paper can be read two
ways, the other reading is a flag: --band (group 3), --pseudo-pick (group 4) and --pseudo-mode (how many
pseudo-labels, and whether they leave the pool); the defaults and why are at ceal_groups and ceal_query.

  python ceal_mcdropout.py                                           # synthetic data, CPU, about 2 minutes
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

# Defaults per dataset. The paper's numbers for its datasets (Tables 1-2, Sec. 4-5); the public CEAL code
# (Gorriz et al., github.com/marc-gorriz/CEAL-Medical-Image-Segmentation) where the paper is silent.
DEFAULTS = {
    "isic2017": dict(split=[1600, 400, 600],  # Table 1: train 1600 (of the official 2000), val 400, official test 600
                     initial=600,             # Table 1: 600 labelled / 1000 unlabelled
                     query=35,                # Sec. 4.2: 10 lowest + 10 highest + 15 random from the low band
                     rounds=10,               # paper silent: reference code nb_iterations = 10
                     epochs_initial=20, epochs=5,  # Sec. 5: 20 epochs initial, 5 per iteration
                     batch_size=32,           # paper silent: reference code fits with batch_size=32
                     lr=1e-4,                 # paper silent: reference code Adam 1e-5 with Dice loss; 1e-4 with BCE+Dice here
                     width=64,                # Sec. 1.2: about 31 M parameters
                     image_size=256,          # paper silent: reference code 192x240; 256x256 keeps 2^4 poolings exact
                     pseudo_step=20,          # Sec. 4.2: "20 x number of iterations" pseudo-labelled (--pseudo-mode)
                     mc_passes=20),           # paper silent ("t steps"): reference code nb_step_predictions = 20
    "lgg": dict(split=[878, 220, 275], initial=329,  # Table 2 (1373 slices with tumour, split by patient here)
                query=35, rounds=10, epochs_initial=20, epochs=5, batch_size=32, lr=1e-4, width=64,
                image_size=256,  # the kaggle_3m slices are 256x256
                pseudo_step=20, mc_passes=20),
    # CPU-sized protocol: 2 min 21 s on 2 idle cores (README, Tests). Same shape as the paper's, scaled down.
    "synthetic": dict(split=[300, 60, 100], initial=60, query=10, rounds=6, epochs_initial=20, epochs=5,
                      batch_size=16, lr=1e-3, width=16, image_size=64, pseudo_step=5, mc_passes=10),
    # Any other dataset: the ISIC protocol; split sizes from the data (common.default_split), the initial set,
    # the query size and the pseudo-label step the ISIC shares of the pool (600, 35 and 20 of 1600:
    # common.pool_share).
    "other": dict(split=None, initial=None, query=None, rounds=10, epochs_initial=20, epochs=5, batch_size=32,
                  lr=1e-4, width=64, image_size=256, pseudo_step=None, mc_passes=20),
}


def parse_args(argv=None):
    p = common.shared_parser(__doc__, ["ceal", "random", "full"], DEFAULTS)
    # CEAL flags
    p.add_argument("--mc-passes", type=int, help="T stochastic passes for the uncertainty map; default per --data: "
                   "isic2017 20, synthetic 10 (paper silent: reference code 20)")
    p.add_argument("--pseudo-step", type=int, help="the 20 of Sec. 4.2's \"20 x number of iterations\" "
                   "pseudo-labels (how they add up: --pseudo-mode); default per --data: isic2017 20, lgg 20, "
                   "synthetic 5, other the ISIC share of the pool (20 of 1600)")
    p.add_argument("--pseudo-mode", default="total", choices=["total", "redraw", "per-iteration"],
                   help="Sec. 4.2's \"20 x number of iterations\" pseudo-labels. total (default): the "
                   "pseudo-labelled set holds pseudo_step x t at iteration t: pseudo_step new ones per iteration, "
                   "which leave the pool for good (Sec. 4.3) and keep their label; redraw: the reference code's, a "
                   "fresh set of pseudo_step x t each iteration from the pool, where they stay (the last set is "
                   "dropped); per-iteration: pseudo_step x t new ones at iteration t, leaving the pool (uses ISIC's "
                   "1000-sample pool up after 8 of 10 iterations: needs --rounds 8)")
    p.add_argument("--band", default="paper", choices=["paper", "reference"],
                   help="group 3, the random low-uncertainty band: paper (default): everything up to 6 of 80 "
                   "histogram bins above the mode, mode bin included, where the paper says these samples \"get "
                   "mixed up with the highly confident\" ones; reference: the reference code's interval from bin "
                   "mode + 6 to bin 47 (common.ceal_groups)")
    p.add_argument("--pseudo-pick", default="nearest", choices=["nearest", "reference"],
                   help="group 4: nearest (default): the pseudo-labels closest to the centre of the histogram's "
                   "mode bin, so the paper's count is met; reference: the reference code's random draw inside the "
                   "mode bin (fewer when the bin holds fewer)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout probability (paper silent; reference code "
                   "uses 0.5 at the bottleneck only; 0.2 between the convolutions of every block here; default 0.2)")
    p.add_argument("--dropout-at", default="every", choices=["every", "bottleneck"],
                   help="every block (Sec. 1.2, default) or bottleneck only (the public CEAL code)")
    p.add_argument("--loss", default="bce+dice", choices=["bce+dice", "dice"],
                   help="paper silent; the reference code trains on soft Dice (default: bce+dice)")
    p.add_argument("--all-slices", action="store_true",
                   help="lgg: keep slices without tumour (the paper keeps the 1373 with tumour)")
    return common.resolve(p.parse_args(argv), DEFAULTS)


def ceal_budget(run, args, n_train):
    """--pseudo-step for other data, and the budget of Sec. 4.2 checked against the training pool of n_train.
    Returns pseudo_of(r): the pseudo-labels iteration r trains on, "20 x number of iterations" (--pseudo-mode)."""
    if args.pseudo_step is None:  # other data: the ISIC share, 20 of the 1600 (Sec. 4.2)
        args.pseudo_step = common.pool_share(n_train, 20, 1600)
        run.update_config(args)
    # The budget: the oracle's queries must fit the pool (an error otherwise). The pseudo-labels the last
    # iteration R needs from the pool (pseudo_step x R for total and redraw, pseudo_step x (1 + ... + R) for
    # per-iteration) are counted too: where they do not fit, the last groups 4 are smaller (ceal_groups serves
    # the oracle first) and the run says so here. Table 2's LGG protocol is such a case: 329 + 35 x 10 + 20 x 10
    # = 879 of 878 slices, so its last iteration pseudo-labels 19.
    pseudo_of = lambda r: args.pseudo_step * (r * (r + 1) // 2 if args.pseudo_mode == "per-iteration" else r)
    R = args.rounds
    n_pseudo = pseudo_of(R) if args.strategy == "ceal" else 0
    common.check_budget(n_train, args.initial, args.query if args.strategy != "full" else 0, R)
    short = args.initial + args.query * R + n_pseudo - n_train
    if args.strategy == "ceal" and short > 0:
        print(f"note: {args.initial} + {args.query} x {R} oracle labels + {n_pseudo} pseudo-labels ({args.pseudo_mode}) "
              f"exceed the training pool of {n_train} by {short}: the last iterations pseudo-label fewer")
    return pseudo_of


def score_pool(model, x, y, pool, args, device):
    """MC dropout (Sec. 4.1): per-pixel variance over T passes, summed per image; also the mean prediction
    thresholded at 0.5 (the pseudo-labels: paper silent, Sec. 4.3 says "predicted by the model"; the reference
    code labels with one plain forward, dropout off) and, for Fig. 5 only, the Dice of that prediction against
    the hidden ground truth (nan where y is None: the pool has no masks, common.pool_truth)."""
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
    n_band = args.query - n_low - n_high
    # Sec. 4.2, group 4: "20 x number of iterations" pseudo-labels. Default (total): the pseudo-labelled
    # set holds pseudo_step x rnd, pseudo_step new ones a round, so ISIC's 1000-sample pool lasts the 10
    # iterations (350 oracle + 200 pseudo) and the selected leave the pool (Sec. 4.3)
    k4 = args.pseudo_step * (1 if args.pseudo_mode == "total" else rnd)
    g1, g2, g3, g4 = common.ceal_groups(  # Sec. 4.2: the four groups (positions into pool)
        scores, n_low, n_high, n_band, k4, rng, band=args.band, pseudo=args.pseudo_pick)
    figures(run, rnd, scores, pool_dice, (g1, g2, g3, g4))
    groups = {"oracle-lowest": pool[g1], "oracle-highest": pool[g2], "oracle-band": pool[g3], "pseudo": pool[g4]}
    return scores, pool_dice, groups, masks[torch.as_tensor(g4, device=device)]


def figures(run, rnd, scores, pool_dice, groups):
    """Fig. 6 (uncertainty histogram, the four groups marked) and Fig. 5 (uncertainty vs Dice of the pool), one
    of each per round: figures/uncertainty_hist_round_<K>.png, figures/uncertainty_vs_dice_round_<K>.png."""
    os.makedirs(run.path("figures"), exist_ok=True)
    marks = {name: scores[g] for name, g in zip(("lowest", "highest", "band", "pseudo"), groups)}
    common.plot_hist(run.path(f"figures/uncertainty_hist_round_{rnd}.png"), scores, 80,
                     "uncertainty (sum of pixel variances)", f"pool uncertainty, round {rnd}", marks=marks)
    if np.isnan(pool_dice).all():  # the pool has no masks (common.pool_truth): no Fig. 5
        return
    series = {"pool": (scores, pool_dice)}
    series.update({name: (scores[g], pool_dice[g]) for name, g in zip(("lowest", "highest", "band", "pseudo"), groups)})
    common.plot(run.path(f"figures/uncertainty_vs_dice_round_{rnd}.png"), series, "uncertainty",
                "Dice of the prediction", f"round {rnd}", kind="scatter")


def keep_positive(data):
    """Only samples whose mask is not empty at the files' own resolution (Data.positive, decided before
    resizing), so the same slices are kept at every --image-size: the CEAL paper's 1373 LGG slices with
    tumour, of which 34 would vanish at 32 px. Data without `positive` (synthetic) uses the masks it has."""
    pos = data.positive if data.positive is not None else data.y.reshape(len(data), -1).any(1)
    return data.subset(np.flatnonzero(pos))


def panel(run, model, data, x, y, ids, args, device, n=4):
    """Fig. 2: image / ground truth / prediction / uncertainty map for a few samples."""
    ids = np.asarray(ids)[:n]
    rows = []
    for b, mean, var in common.mc_dropout(model, x, ids, args.mc_passes, args.batch_size, device, args.amp):
        for j, i in enumerate(b.tolist()):
            rows.append([data.x[i], data.y[i], (mean[j] > 0.5).float().cpu().numpy(), var[j].float().cpu().numpy()])
    common.save_panel(run.path("panel.png"), rows, 4, ["image", "ground truth", "prediction", "uncertainty"])


def main(argv=None):
    args = parse_args(argv)
    run, device = common.Run.start(__file__, args)

    data = common.load_data(args.data, args.data_dir, args.image_size, 3, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    if args.data == "lgg" and not args.all_slices:
        data = keep_positive(data)  # Sec. 2: the 1373 slices with tumour (full-resolution masks, any size)
    # other data: the ISIC shares, D^L 600 of the 1600 (37.5 %, Sec. 4) and +35 per iteration (Sec. 4.2)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 600, 35, 1600)
    pseudo_of = ceal_budget(run, args, len(train_ids))
    # --strategy full, the ceiling: the whole pool for the optimiser steps of a CEAL run with these flags
    rounds, epochs0, steps = common.ceiling(args, len(train_ids), pseudo_of)
    x, y = common.to_device(data, device)

    # U-Net of Sec. 1.2; BatchNorm after every convolution is our choice (paper silent; the reference code has none)
    model = common.prepare_model(UNet(3, 1, args.width, dropout=args.dropout, dropout_at=args.dropout_at), device,
                                 args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = common.bce_dice_loss if args.loss == "bce+dice" else common.soft_dice_loss
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)
    n0 = len(train_ids) if args.strategy == "full" else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)
    pool = np.setdiff1d(train_ids, labeled)
    pseudo = np.zeros(0, np.int64)
    start, state = run.resume(model, opt, rng, gen)
    if state:
        labeled, pseudo, pool = state["labeled"], state["pseudo"], state["pool"]
    target = common.training_target(y, labeled, pseudo, state["pseudo_masks"] if state else None)
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, args.strategy == "ceal",
                                                         pseudo_of if args.strategy == "ceal" else None))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        t0, queried = time.time(), {}
        if rnd > 0:  # the query rule: the only part that differs from a random baseline
            if args.strategy == "ceal":  # Sec. 4.1-4.3
                scores, pool_dice, groups, masks = ceal_query(run, rnd, model, x, common.pool_truth(data, y), pool,
                                                              args, rng, device)
            else:  # random: pool_scores.csv keeps the same columns, the score left empty
                scores, new = [""] * len(pool), common.query_random(pool, args.query, rng)
                groups, masks, pool_dice = {"oracle-random": new}, None, scores  # same oracle budget, no pseudo-labels
            queried = {how: [data.ids[i] for i in g] for how, g in groups.items()}
            # the audit trail: every pool sample's score and whether it was picked; the picks as the model saw them
            # pool_scores.csv: the score that selects, and the Dice of Fig. 5 (never used to select)
            run.log_pool_scores(rnd, [data.ids[i] for i in pool], {"uncertainty": scores, "dice": pool_dice}, queried)
            common.save_picks(run, rnd, model, data, x, groups,
                              dict(zip(pool.tolist(), scores)) if args.strategy == "ceal" else None,
                              args.batch_size, device, args.amp)
            oracle.ask(run, rnd, np.concatenate([g for how, g in groups.items() if how != "pseudo"]), data, y,
                       model, x, args.batch_size, device, args.amp)
            labeled, pseudo, pool = common.add_labels(target, y, groups, masks, labeled, pseudo, pool,
                                                      redraw=args.pseudo_mode == "redraw")  # Sec. 4.3
        else:
            queried["initial"] = [data.ids[i] for i in labeled]  # the seeded random start (all of it for "full")
            oracle.ask(run, rnd, labeled, data, y, model, x, args.batch_size, device, args.amp)
            target = common.training_target(y, labeled)  # the oracle's answers (a person's: --oracle folder)
        select_s, t0 = time.time() - t0, time.time()
        # training: 20 epochs initially, then 5 per iteration (Sec. 5), fine-tuning the same model (paper silent;
        # Sec. 4.3: "the model is again trained on D^L"; the reference code continues from its weights)
        epochs = epochs0 if rnd == 0 else args.epochs

        def on_epoch(e, loss, _s):  # Figs. 7-10: validation Dice per epoch
            vd = float(common.evaluate(model, x, y, val_ids, args.batch_size, device, args.amp)[0].mean()) if len(val_ids) else None
            progress.epoch(rnd, e, epochs, loss, val_dice=vd)
            model.train()

        common.train(model, opt, x, target, np.concatenate([labeled, pseudo]), epochs, args.batch_size, device=device, amp=args.amp,
                     loss_fn=loss_fn, generator=gen, steps=steps, on_epoch=on_epoch)
        train_s = time.time() - t0

        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        val = common.evaluate(model, x, y, val_ids, args.batch_size, device, args.amp)[0] if len(val_ids) else [np.nan]
        row = {"round": rnd, "labeled": len(labeled), "pseudo": len(pseudo), "dice_mean": float(dice.mean()),
               "dice_std": float(dice.std()), "iou_mean": float(iou.mean()), "train_s": train_s, "select_s": select_s,
               "val_dice": float(np.mean(val)), "oracle_queries": len(labeled) - n0, "pool_left": len(pool)}
        run.end_round(row, queried, progress, model, opt, rng, gen, labeled=labeled, pseudo=pseudo, pool=pool,
                      pseudo_masks=target[torch.as_tensor(pseudo, device=device)].cpu())

    panel(run, model, data, x, y, pool if len(pool) else test_ids, args, device)
    return run.finish({"paper_dice": {"isic2017": 0.77, "lgg": 0.58}.get(args.data)})


if __name__ == "__main__":
    common.run_main(main)
