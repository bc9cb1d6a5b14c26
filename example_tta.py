"""Add your method: a sixth query rule in one short script. Test-time-augmentation (TTA) variance.

Predict each pool image under the four flips (none, horizontal, vertical, both), undo each flip, and query
the images whose per-pixel variance across the four predictions, summed over pixels, is largest (the
TTA uncertainty of Wang et al., Neurocomputing 338, 2019, used here as a query rule).

  python example_tta.py                     # synthetic data, CPU, about a minute
  python example_tta.py --strategy random   # the baseline, same budget (full: the whole pool, the same steps)
  python example_tta.py --data kvasir-seg --data-dir ~/data/Kvasir-SEG --device cuda
"""
import time

import numpy as np
import torch

import common
import oracle
from unet import UNet

# Not a paper's protocol: a CPU-sized one for synthetic data, and a generic one for any other dataset.
DEFAULTS = {
    "synthetic": dict(split=[300, 60, 100], initial=30, query=15, rounds=4, epochs_initial=15, epochs=5,
                      batch_size=16, lr=1e-3, width=16, image_size=64),
    "other": dict(split=None, initial=None, query=None, rounds=5, epochs_initial=20, epochs=5, batch_size=16,
                  lr=1e-4, width=32, image_size=128),
}


def parse_args(argv=None):
    p = common.shared_parser(__doc__, ["tta", "random", "full"], DEFAULTS)
    # TTA flags: your method's own flags go here, each with its default and its source
    return common.resolve(p.parse_args(argv), DEFAULTS)


@torch.inference_mode()
def tta_variance(model, x, pool, batch_size, device, amp=False):
    """Sum over pixels of the variance of the four flip-TTA probabilities (flips undone before comparing)."""
    scores = []
    for b in common.batches(np.asarray(pool), batch_size):
        probs = [common.predict(model, x, b, batch_size, device, amp, view=lambda xb: xb.flip(dims))
                 .flip([d - 1 for d in dims]) for dims in ([], [3], [2], [2, 3])]
        scores.append(torch.stack(probs).var(0, unbiased=False).sum((1, 2)))
    return torch.cat(scores).cpu().numpy()


def main(argv=None):
    args = parse_args(argv)
    run, device = common.Run.start(__file__, args, parse_args)

    data = common.load_data(args.data, args.data_dir, args.image_size, 3, args.seed,
                            n=sum(args.split) if args.split else None, workers=args.workers)
    # other data: 10 % of the pool to start and 5 % per round (our choice: no paper)
    train_ids, val_ids, test_ids = common.split_data(run, data, args, 10, 5, 100)
    common.check_budget(len(train_ids), args.initial, args.query, args.rounds)
    rounds, epochs0, steps = common.ceiling(args, len(train_ids))  # --strategy full: the ceiling
    x, y = common.to_device(data, device)

    model = common.prepare_model(UNet(3, 1, args.width), device, args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)
    n0 = len(train_ids) if args.strategy == "full" else args.initial
    labeled = rng.choice(train_ids, n0, replace=False)
    pool = np.setdiff1d(train_ids, labeled)
    start, state = run.resume(model, opt, rng, gen)
    oracle.restore(run, start, data, y)  # --oracle folder: the person's labels of the finished rounds
    if state:
        labeled, pool = state["labeled"], state["pool"]
    progress = common.Progress(run, epochs0 + rounds * args.epochs,
                               0 if start == 0 else epochs0 + (start - 1) * args.epochs,
                               plan=common.Progress.plan(n0, args.query, rounds, epochs0, args.epochs,
                                                         len(train_ids) - n0, scored=args.strategy != "random"))

    for rnd in range(start, rounds + 1):
        if common.pool_used_up(rnd, pool):  # nothing left to query: the finished rounds stand
            break
        t0, queried = time.time(), {}
        if rnd > 0:  # the query rule: the only part that differs from a random baseline
            if args.strategy != "random":  # your rule: the first of shared_parser's strategies
                scores = tta_variance(model, x, pool, args.batch_size, device, args.amp)
                new = common.top_k(pool, scores, args.query)
            else:  # random: pool_scores.csv keeps the same columns, the score left empty
                scores, new = [""] * len(pool), common.query_random(pool, args.query, rng)
            queried[f"oracle-{args.strategy}"] = [data.ids[i] for i in new]
            # the audit trail: every pool sample's score and whether it was picked; the picks as the model saw them
            run.log_pool_scores(rnd, [data.ids[i] for i in pool], {"tta_variance": scores}, queried)
            common.save_picks(run, rnd, model, data, x, {f"oracle-{args.strategy}": new},
                              dict(zip(pool.tolist(), scores)) if args.strategy != "random" else None,
                              args.batch_size, device, args.amp)
            labeled, pool = np.concatenate([labeled, new]), np.setdiff1d(pool, new)
        else:  # round 0: the seeded random start (the whole pool for "full")
            queried["full" if args.strategy == "full" else "initial"] = [data.ids[i] for i in labeled]
        select_s = time.time() - t0
        oracle.ask(run, rnd, new if rnd > 0 else labeled, data, y, model, x, args.batch_size, device, args.amp)
        t0 = time.time()
        epochs = epochs0 if rnd == 0 else args.epochs
        for e, loss, _ in common.train_epochs(model, opt, x, y, labeled, epochs, args.batch_size, device=device,
                                              amp=args.amp, generator=gen, steps=steps):
            progress.epoch(rnd, e, epochs, loss)
        train_s = time.time() - t0

        dice, iou = common.evaluate(model, x, y, test_ids, args.batch_size, device, args.amp)
        row = common.round_row(rnd, len(labeled), 0, dice, iou, train_s, select_s)
        run.end_round(row, queried, progress, model, opt, rng, gen, labeled=labeled, pool=pool)

    oracle.predict_rest(run, model, data, x, np.setdiff1d(train_ids, labeled), args.batch_size, device, args.amp)
    common.prediction_panel(run, model, data, x, test_ids[:4], args.batch_size, device, args.amp)
    return run.finish()


if __name__ == "__main__":
    common.run_main(main)
