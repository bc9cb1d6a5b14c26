"""What each rule asked for, from the run folders alone: per script, strategy and round (mean over the runs,
normally seeds), the numbers the docs use to explain why a rule wins or loses against random.

  python benchmarks/pick_stats.py RUNS --data-dir ../shared/data/Kvasir-SEG [--out results/kvasir-seg/picks.md]

Columns, per round r >= 1 (the oracle's picks of round r, against the pool they were picked from):
  fg_picks / fg_pool   mean foreground share (polyp pixels / pixels) of the picks / of the whole pool
  dup_labeled          share of picks that are near-duplicates of an image already labelled
  dup_picks            share of picks that are near-duplicates of another pick of the same round
  score_cv             spread of the selecting score over the pool: std / mean
  rho_score_fg         Spearman correlation, over the pool, of the selecting score with the foreground share
  dice_before          test Dice of the model that scored the pool (the previous round's)
Near-duplicate: Pearson correlation of the two images' 16 x 16 grayscale thumbnails >= --dup (0.95); the
header prints how often two images drawn at random from the pool are that close, for scale. The masks and
images are read with the run's own loader and image size (common.load_data), not from the run folders.
"""
import argparse
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

# The column of pool_scores.csv that each script's rule ranks by (random leaves it empty).
SCORE = {"ceal_mcdropout": "uncertainty", "region_uncertainty": "score", "polyp_weighted_cluster": "uncertainty",
         "dsal_fingerbones": "mean", "example_tta": "tta_variance", "example_claspe": "entropy",
         "ssl_coldstart": "distance"}


def rank(a):
    return np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)


def spearman(a, b):
    a, b = rank(a), rank(b)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def read(run, name):
    path = os.path.join(run, name)
    return list(csv.DictReader(open(path))) if os.path.isfile(path) else []


def thumbnails(x):
    """(N, C, S, S) uint8 -> (N, 256) z-scored 16 x 16 grayscale, so that a dot product / 256 is Pearson's r."""
    g = x.astype(np.float32).mean(1)
    n, s = g.shape[0], g.shape[1]
    t = g.reshape(n, 16, s // 16, 16, s // 16).mean((2, 4)).reshape(n, -1)
    t = (t - t.mean(1, keepdims=True)) / (t.std(1, keepdims=True) + 1e-6)
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    p.add_argument("--data-dir", required=True, help="the dataset root the runs read")
    p.add_argument("--dup", type=float, default=0.95, help="thumbnail correlation of a near-duplicate (0.95)")
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    runs = sorted(r for root in args.runs for r in
                  ([root] if os.path.isfile(os.path.join(root, "config.json")) else
                   [os.path.join(root, d) for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json"))]))
    data_cache, rows = {}, defaultdict(list)
    for run in runs:
        cfg = json.load(open(os.path.join(run, "config.json")))
        a, script = cfg["args"], os.path.basename(cfg["script"]).replace(".py", "")
        key = (a["data"], a["image_size"])
        if key not in data_cache:
            d = common.load_data(a["data"], args.data_dir, a["image_size"], 3, 0, quiet=True)
            data_cache[key] = ({i: k for k, i in enumerate(d.ids)}, (d.y > 0).mean((1, 2)), thumbnails(d.x))
        index, fg, thumb = data_cache[key]
        rounds = {int(r["round"]): r for r in read(run, "rounds.csv")}
        queried = defaultdict(list)
        for q in read(run, "queried.csv"):
            queried[int(q["round"])].append((q["sample_id"], q["how"]))
        pool_rows = defaultdict(list)
        for r in read(run, "pool_scores.csv"):
            pool_rows[int(r["round"])].append(r)
        labeled, col = [], SCORE.get(script)
        if 0 not in queried and 1 in pool_rows:  # a run that did not log its initial set: the pool's complement
            in_pool = {r["sample_id"] for r in pool_rows[1]}
            train = json.load(open(os.path.join(run, "splits.json")))["train"]
            queried[0] = [(i, "initial") for i in train if i not in in_pool]
        for rnd in sorted(queried):
            if rnd not in pool_rows:  # a random start, not scored: labelled, no statistics
                labeled += [index[i] for i, how in queried[rnd] if "pseudo" not in how]
                continue
            picks = np.array([index[i] for i, how in queried[rnd] if "pseudo" not in how])
            pool = np.array([index[r["sample_id"]] for r in pool_rows[rnd]])
            sim_lab = thumb[picks] @ thumb[labeled].T / thumb.shape[1] if len(labeled) else np.zeros((len(picks), 0))
            sim_pick = thumb[picks] @ thumb[picks].T / thumb.shape[1]
            np.fill_diagonal(sim_pick, -1)
            score = [r.get(col, "") for r in pool_rows[rnd]]
            has_score = col is not None and all(s not in ("", None) for s in score) and len(score) > 1
            score = np.array([float(s) for s in score]) if has_score else None
            rows[(script, a["strategy"], rnd)].append({
                "labeled": len(labeled) + len(picks), "fg_picks": fg[picks].mean(), "fg_pool": fg[pool].mean(),
                "dup_labeled": (sim_lab.max(1) >= args.dup).mean() if sim_lab.size else 0.0,
                "dup_picks": (sim_pick.max(1) >= args.dup).mean() if len(picks) > 1 else 0.0,
                "score_cv": score.std() / abs(score.mean()) if has_score and score.mean() != 0 else np.nan,
                "rho_score_fg": spearman(score, fg[pool]) if has_score else np.nan,
                "dice_before": float(rounds[rnd - 1]["dice_mean"]) if rnd - 1 in rounds else np.nan})
            labeled += picks.tolist()
    if not rows:
        sys.exit("no run folder with rounds after the first found under " + " ".join(args.runs))
    # scale of a near-duplicate: pairs of distinct images drawn at random from the whole set
    _, _, thumb = next(iter(data_cache.values()))
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(thumb), (2, 20000))
    keep = i != j
    chance = float(((thumb[i[keep]] * thumb[j[keep]]).sum(1) / thumb.shape[1] >= args.dup).mean())
    cols = ["labeled", "fg_picks", "fg_pool", "dup_labeled", "dup_picks", "score_cv", "rho_score_fg", "dice_before"]
    lines = [f"Pick statistics of {len(runs)} runs (mean over the runs of each row; `python benchmarks/pick_stats.py`). "
             f"Near-duplicate: 16x16 thumbnail correlation >= {args.dup}; two random images are that close "
             f"{100 * chance:.2f} % of the time.", "",
             "| script | strategy | round | runs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 4) + "|"]
    for (script, strategy, rnd), rs in sorted(rows.items()):
        vals = [np.nanmean([r[c] for r in rs]) if not all(np.isnan(r[c]) for r in rs) else np.nan for c in cols]
        lines.append(f"| {script} | {strategy} | {rnd} | {len(rs)} | " + " | ".join(
            "" if np.isnan(v) else f"{v:.0f}" if c == "labeled" else f"{v:.3f}" for c, v in zip(cols, vals)) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
