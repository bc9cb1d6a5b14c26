"""Finally Outshining the Random Baseline (Lüth et al., TMLR 2026): ClaSP PE on 2D binary images.

Class-stratified Scheduled Power Predictive Entropy: part of each query is reserved for the images whose
uncertainty sits on predicted foreground (class stratification), and within each stratum the pool is
sampled with probability proportional to score^beta rather than ranked, with beta growing over the rounds
(diversity early, exploitation late). The nnActive benchmark (Lüth et al., TMLR 2025) found no query rule
that reliably beat a foreground-aware random baseline; ClaSP PE is the only one reported to generally beat it.

  python example_claspe.py                       # synthetic data, CPU, about 30 seconds
  python example_claspe.py --strategy random     # the baseline, same model, draw and training
  python example_claspe.py --data kvasir-seg --data-dir ~/data/Kvasir-SEG --device cuda

--strategy entropy is the ablation (plain predictive-entropy top-k); full the ceiling (the whole pool, same steps).

Sources: the paper (https://openreview.net/forum?id=UamXueEaYW, arXiv 2601.13677; only its abstract was
read) and the authors' code, github.com/MIC-DKFZ/nnActive, where ClaSP PE is the strategy
"class_power_pe66_exp" (ClassBalancedExpScheduledPowerEntropy_66FG, nnactive/strategies/__init__.py;
renamed "ClaSP PE" in nnactive/analyze/qualitative_loops.py). What each piece follows:
- power noising: nnactive/strategies/utils.py power_noising(), log s + Gumbel(0, 1/beta); top-k of that is
  a sample without replacement with P(i) proportional to s_i^beta (Gumbel-top-k; Kirsch et al., "Stochastic
  batch acquisition", TMLR 2023, https://openreview.net/forum?id=vcHwQyNBjW). Verified in code.
- class stratification: nnactive/strategies/entropy_balanced.py (ClassBalancedEntropy_66FG) and
  uncertainties.py class_pred_entropy(): a fraction ratio_fg = 0.66 of the query, int(q * 0.66), is ranked
  per foreground class c by the class-weighted entropy H(x) * p_c(x) summed over the patch; the rest by
  the plain entropy H(x). Verified in code. 2D binary: one foreground class, a patch is a whole image.
- the schedule: "exp" (the name of the variant) and "decaying" noise (the abstract). Its formula and
  constants are NOT verified (the scheduled subclass is not in the code we could read). Our choice:
  beta grows geometrically from --beta-start at the first query to --beta-end at the last (schedule()).
Not adapted: the authors average the probabilities of their 5 cross-validation folds; here one model.
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


@torch.inference_mode()
def entropy_scores(model, x, pool, batch_size, device, amp=False):
    """Per pool image: H_i = sum over pixels of the binary predictive entropy H(p) (bits), and the foreground
    stratum's score F_i = sum over pixels of H(p) * p (the authors' class_pred_entropy: H(x) * p_c(x))."""
    H, F = [], []
    for _, p in common.predict_batches(model, x, pool, batch_size, device, amp):
        h = common.binary_entropy(p)
        H.append(h.flatten(1).sum(1))
        F.append((h * p).flatten(1).sum(1))
    return torch.cat(H).double().cpu().numpy(), torch.cat(F).double().cpu().numpy()


def power_noise(scores, beta, rng):
    """Log-scale power noising: log s_i + Gumbel(0, 1/beta). Ranking these = sampling s_i^beta without
    replacement; beta = inf gives the plain ranking. Scores of 0 are clamped to the smallest positive float."""
    s = np.maximum(np.asarray(scores, dtype=np.float64), np.finfo(np.float64).tiny)
    return np.log(s) + rng.gumbel(0.0, 1.0 / beta, size=s.shape)


def schedule(rnd, rounds, beta_start, beta_end):
    """beta for query round rnd = 1..rounds: geometric from beta_start (first query) to beta_end (last), so the
    Gumbel noise scale 1/beta decays exponentially (our reading of "exp"; constants not verified)."""
    return beta_start if rounds <= 1 else beta_start * (beta_end / beta_start) ** ((rnd - 1) / (rounds - 1))


def claspe(pool, H, F, k, beta, rng, fg_share=0.66):
    """ClaSP PE for one round. int(k * fg_share) picks by noised F (foreground stratum), then the rest of the
    budget by noised H among the images not yet picked (class-agnostic stratum). Every pool image is in both
    strata, so no budget is left over. Returns (foreground picks, entropy picks, noised F, noised H)."""
    pool = np.asarray(pool)
    nf, nh = power_noise(F, beta, rng), power_noise(H, beta, rng)
    fg = np.argsort(-nf, kind="stable")[:min(int(k * fg_share), len(pool))]
    rest = np.setdiff1d(np.arange(len(pool)), fg)
    ent = rest[np.argsort(-nh[rest], kind="stable")[:k - len(fg)]]
    return pool[fg], pool[ent], nf, nh


def parse_args(argv=None):
    p = common.shared_parser(__doc__, ["claspe", "random", "entropy", "full"], DEFAULTS)
    # ClaSP PE flags
    p.add_argument("--beta-start", type=float, default=1.0, help="power beta at the first query: strong "
                   "noise (default: 1, the authors' PowerPE beta, nnactive/strategies/entropy_pred.py)")
    p.add_argument("--beta-end", type=float, default=40.0, help="power beta at the last query (default: 40, "
                   "not verified: our choice, the largest finite beta of the authors' PowerBALD ablation)")
    p.add_argument("--fg-share", type=float, default=0.66, help="share of each query for the foreground "
                   "stratum (default: 0.66, the authors' ratio_fg of ClaSP PE)")
    args = common.resolve(p.parse_args(argv), DEFAULTS)
    if not (args.beta_start > 0 and args.beta_end > 0 and 0 <= args.fg_share <= 1):
        raise common.UserError(f"need --beta-start > 0, --beta-end > 0 and 0 <= --fg-share <= 1; got "
                               f"{args.beta_start}, {args.beta_end}, {args.fg_share}")
    return args


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
            H, F = entropy_scores(model, x, pool, args.batch_size, device, args.amp)
            beta = schedule(rnd, args.rounds, args.beta_start, args.beta_end) if args.strategy == "claspe" else np.nan
            nf = nh = np.full(len(pool), np.nan)
            if args.strategy == "claspe":
                fg, ent, nf, nh = claspe(pool, H, F, args.query, beta, rng, args.fg_share)
                groups = {"oracle/fg": fg, "oracle/entropy": ent}
            elif args.strategy == "entropy":
                groups = {"oracle": common.top_k(pool, H, args.query)}
            else:
                groups = {"oracle": common.query_random(pool, args.query, rng)}
            new = np.concatenate(list(groups.values()))
            stratum = {i: how for how, idx in groups.items() for i in idx}
            run.log_pool_scores(rnd, [data.ids[i] for i in pool],
                                {"entropy": H, "fg_entropy": F, "beta": [beta] * len(pool), "noised_fg": nf,
                                 "noised_entropy": nh, "stratum": [stratum.get(i, "") for i in pool]},
                                [f"oracle-{args.strategy}" if i in stratum else "" for i in pool])
            common.save_picks(run, rnd, model, data, x, groups, dict(zip(pool, H)), args.batch_size, device, args.amp)
            queried[f"oracle-{args.strategy}"] = [data.ids[i] for i in new]
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
