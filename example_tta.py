"""Add your method: a sixth query rule in one short script. Test-time-augmentation (TTA) variance.

Predict each pool image under the four flips (none, horizontal, vertical, both), undo each flip, and query
the images whose per-pixel variance across the four predictions, summed over pixels, is largest (the
TTA uncertainty of Wang et al., Neurocomputing 338, 2019, used here as a query rule).

  python example_tta.py                     # synthetic data, CPU, about a minute
  python example_tta.py --strategy random   # the baseline, same budget
  python example_tta.py --strategy full     # the ceiling: the whole pool, the same optimiser steps
  python example_tta.py --data kvasir-seg --data-dir ~/data/Kvasir-SEG --device cuda
"""
import math
import time

import numpy as np
import torch

import common
from unet import UNet

# Not a paper's protocol: a CPU-sized one for synthetic data, and a generic one for any other dataset.
DEFAULTS = {
    "synthetic": dict(split=[300, 60, 100], initial=30, query=15, rounds=4, epochs_initial=15, epochs=5,
                      batch_size=16, lr=1e-3, width=16, image_size=64),
    "other": dict(split=None, initial=None, query=None, rounds=5, epochs_initial=20, epochs=5, batch_size=16,
                  lr=1e-4, width=32, image_size=128),
}


@torch.inference_mode()
def tta_variance(model, x, pool, batch_size, device):
    """Sum over pixels of the variance of the four flip-TTA probabilities (flips undone before comparing)."""
    model.eval()
    scores = []
    for b in common.batches(torch.as_tensor(pool, device=device), batch_size):
        xb = common.to_input(x[b])
        probs = [torch.sigmoid(model(xb.flip(dims)).float()[:, 0]).flip([d - 1 for d in dims])
                 for dims in ([], [3], [2], [2, 3])]
        scores.append(torch.stack(probs).var(0, unbiased=False).sum((1, 2)))
    return torch.cat(scores).cpu().numpy()


def main(argv=None):
    args = common.resolve(common.shared_parser(__doc__, ["tta", "random", "full"], DEFAULTS).parse_args(argv), DEFAULTS)
    device = common.get_device(args.device)
    common.seed_everything(args.seed, args.deterministic)
    run = common.Run(__file__, args, device)

    data = common.load_data(args.data, args.data_dir, args.image_size, 3, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    # other data: 10 % of the pool to start and 5 % per round (our choice: no paper)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 10, 5, 100)
    common.check_budget(len(train_ids), args.initial, args.query, args.rounds)
    full = args.strategy == "full"  # the ceiling: the whole pool, trained for the AL run's optimiser steps
    steps = common.al_steps(common.Progress.plan(args.initial, args.query, args.rounds, args.epochs_initial,
                                                 args.epochs, len(train_ids) - args.initial), args.batch_size)
    rounds, epochs0 = (0, math.ceil(steps / math.ceil(len(train_ids) / args.batch_size))) if full else \
        (args.rounds, args.epochs_initial)
    x, y = common.to_device(data, device)

    model = common.prepare_model(UNet(3, 1, args.width), device, args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)
    n0 = len(train_ids) if full else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)
    pool = np.setdiff1d(train_ids, labeled)
    start, state = 0, run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        labeled, pool, start = state["labeled"], state["pool"], state["round"] + 1
        rng.bit_generator.state = state["rng_select"]
        gen.set_state(state["rng_batches"])
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, args.strategy == "tta"))

    for rnd in range(start, rounds + 1):
        t0, queried = time.time(), {}
        if rnd > 0:  # the query rule: the only part that differs from a random baseline
            if args.strategy == "tta":
                scores = tta_variance(model, x, pool, args.batch_size, device)
                new = common.top_k(pool, scores, args.query)
            else:  # random: pool_scores.csv keeps the same columns, the score left empty
                scores, new = [""] * len(pool), common.query_random(pool, args.query, rng)
            queried["oracle"] = [data.ids[i] for i in new]
            # the audit trail: every pool sample's score and whether it was picked; the picks as the model saw them
            run.log_pool_scores(rnd, [data.ids[i] for i in pool], {"tta_variance": scores}, queried)
            common.save_picks(run, rnd, model, data, x, {"oracle": new},
                              dict(zip(pool.tolist(), scores)) if args.strategy == "tta" else None,
                              args.batch_size, device, args.amp)
            labeled, pool = np.concatenate([labeled, new]), np.setdiff1d(pool, new)
        else:
            queried["full" if full else "initial"] = [data.ids[i] for i in labeled]  # the seeded random start
        select_s, t0 = time.time() - t0, time.time()
        epochs = epochs0 if rnd == 0 else args.epochs
        if full:
            common.train_steps(model, opt, x, y, labeled, steps, args.batch_size, device=device, amp=args.amp,
                               generator=gen, on_epoch=lambda e, loss, _: progress.epoch(rnd, e, epochs, loss))
        else:
            common.train(model, opt, x, y, labeled, epochs, args.batch_size, device=device, amp=args.amp,
                         generator=gen, on_epoch=lambda e, loss, _: progress.epoch(rnd, e, epochs, loss))
        train_s = time.time() - t0

        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        row = {"round": rnd, "labeled": len(labeled), "pseudo": 0, "dice_mean": float(dice.mean()),
               "dice_std": float(dice.std()), "iou_mean": float(iou.mean()), "train_s": train_s, "select_s": select_s}
        run.log_round(row, queried)
        run.save_checkpoint({"round": rnd, "model": model.state_dict(), "opt": opt.state_dict(), "labeled": labeled,
                             "pool": pool, "rng_select": rng.bit_generator.state, "rng_batches": gen.get_state()})
        common.learning_curve(run, run.read_csv("rounds.csv"))
        progress.round(row)

    shown = test_ids[:4]
    probs = common.predict(model, x, shown, args.batch_size, device).cpu().numpy()
    common.save_panel(run.path("panel.png"), [[data.x[i], data.y[i], p > 0.5] for i, p in zip(shown, probs)], 3,
                      ["image", "ground truth", "prediction"])
    rows = run.read_csv("rounds.csv")
    run.write_json("summary.json", {"final_dice": float(rows[-1]["dice_mean"]), "labeled": int(rows[-1]["labeled"]),
                                    "wall_s": run.elapsed()})
    print(f"done: test dice {float(rows[-1]['dice_mean']):.4f} with {rows[-1]['labeled']} labelled; {run.dir}")
    return run.dir


if __name__ == "__main__":
    common.run_main(main)
