"""Collect run folders of any script into one results table and one learning-curve figure.

Groups the finished rounds of every run by script, strategy, dataset and labelled count, and writes Dice
and IoU as mean ± sample std (ddof = 1) over the n runs in each group (normally seeds): results.md,
results.csv and curves.png (test Dice against labelled samples, ±1 std bands). A run without a readable
summary.json (still running, or crashed) is unfinished: its rounds count in the per-round table, which says how
many runs of each row are unfinished, and --final leaves it out (its last round is not a final result). The
paper-specific tables of each script (`SCRIPT.py --tables RUN_DIR ...`) are views of the same collector
(common.collect_runs / summarise).

  python collect.py runs/                                    # print the table of every run under runs/
  python collect.py runs/ --out results/synthetic            # also write results.md, results.csv, curves.png
  python collect.py runs/ --data lgg --by script strategy --final   # only LGG runs; final round per finished run
  python collect.py runs/ --out results/kvasir-seg --vs-random     # also each rule against its script's random

--vs-random adds vs_random.md and curves_by_script.png: per script, its rule(s) against its own --strategy random
at each labelled count (difference of the means, and "trails" where the rule's mean is below random's by more
than one sample std, the larger of the two), with the ceiling (--strategy full: the whole pool, the same
optimiser steps) as a dashed line.
"""
import argparse
import csv
import os
import sys

import common
import tables

KEYS = ["script", "strategy", "data", "labeled"]


def collect(paths, by=KEYS, data=None, final=False):
    """summarise's rows (n, mean and sample std of Dice and IoU per group), each with `unfinished`: how many
    of its runs have no readable summary.json. final: only the last round of each finished run; the unfinished
    runs are left out (and counted on stderr)."""
    rows = common.collect_runs(paths)
    keys = set().union(*rows) - {"flags"}  # a flag of the runs or a rounds.csv column ("flags" is their dict)
    bad = [k for k in by if k not in keys]
    if rows and bad:  # no rows: main's "no finished rounds" says why
        raise common.UserError(f"--by {' '.join(bad)}: no such flag or rounds.csv column in the runs under "
                               f"{' '.join(paths)}; expected some of: {' '.join(sorted(keys))}")
    if data:
        rows = [r for r in rows if r.get("data") == data]
    if final:  # only the last round of each finished run
        left_out = sorted({r["run"] for r in rows if not r["finished"]})
        if left_out:
            print(f"--final: left out {len(left_out)} unfinished run(s) (no readable summary.json: still running or "
                  "crashed): " + ", ".join(left_out), file=sys.stderr)
        last = {}
        for r in rows:
            if r["finished"]:
                last[r["run"]] = r
        rows = list(last.values())
    summary = common.summarise(rows, by, values=("dice_mean", "iou_mean"))
    unfinished = {}
    for r in rows:
        if not r["finished"]:
            unfinished.setdefault(tuple(tables._key(r.get(k)) for k in by), set()).add(r["run"])
    for s in summary:
        s["unfinished"] = len(unfinished.get(tuple(s[k] for k in by), ()))
    return summary


def curves(path, summary, title=""):
    """One line per (script, strategy, data): mean test Dice against labelled count, ±1 std band."""
    series = {}
    for r in summary:
        label = f"{r['script'].split('_')[0]}/{r['strategy']}" + (f" ({r['data']})" if len({s['data'] for s in summary}) > 1 else "")
        xs, ys, sd = series.setdefault(label, ([], [], []))
        xs.append(r["labeled"])
        ys.append(r["dice_mean"])
        sd.append(0.0 if r["dice_mean_std"] != r["dice_mean_std"] else r["dice_mean_std"])  # n = 1: NaN, no band
    common.plot(path, series, "labelled samples", "test Dice", title)


def vs_random(summary):
    """Rows of (script, data, strategy, labelled): the rule's mean and std, random's, their difference, and
    whether the rule trails random by more than one sample std (the larger of the two; n >= 2 each)."""
    key = lambda r: (r["script"], r["data"], r["labeled"])
    random = {key(r): r for r in summary if r["strategy"] == "random"}
    full = {(r["script"], r["data"]): r for r in summary if r["strategy"] == "full"}
    out = []
    for r in summary:
        b = random.get(key(r))
        if r["strategy"] in ("random", "full") or b is None:
            continue
        sd = max(r["dice_mean_std"], b["dice_mean_std"])
        c = full.get((r["script"], r["data"]))
        out.append({"script": r["script"], "data": r["data"], "strategy": r["strategy"], "labeled": r["labeled"],
                    "n": f"{r['n']} / {b['n']}", "rule": f"{r['dice_mean']:.3f} ± {r['dice_mean_std']:.3f}",
                    "random": f"{b['dice_mean']:.3f} ± {b['dice_mean_std']:.3f}",
                    "diff": f"{r['dice_mean'] - b['dice_mean']:+.3f}",
                    "verdict": "n < 2" if sd != sd else "trails" if r["dice_mean"] < b["dice_mean"] - sd else
                    "leads" if r["dice_mean"] > b["dice_mean"] + sd else "within 1 std",
                    "ceiling": f"{c['dice_mean']:.3f} ± {c['dice_mean_std']:.3f} ({c['labeled']})" if c else ""})
    return out


def curves_by_script(path, summary, columns=2):
    """One panel per (script, data): each rule and random with ±1 std bands, the ceiling as a flat line over
    the same labelled range; the panels side by side in one PNG."""
    from PIL import Image
    panels = []
    for script, data in sorted({(r["script"], r["data"]) for r in summary}):
        rows = [r for r in summary if (r["script"], r["data"]) == (script, data)]
        series = {}  # the rule(s) first, then random, then the ceiling: the same colours in every panel
        for r in sorted(rows, key=lambda r: r["strategy"] == "random"):
            if r["strategy"] != "full":
                xs, ys, sd = series.setdefault(r["strategy"], ([], [], []))
                xs.append(r["labeled"])
                ys.append(r["dice_mean"])
                sd.append(0.0 if r["dice_mean_std"] != r["dice_mean_std"] else r["dice_mean_std"])
        xs = [r["labeled"] for r in rows if r["strategy"] != "full"]
        for r in rows:
            if r["strategy"] == "full" and xs:
                sd = 0.0 if r["dice_mean_std"] != r["dice_mean_std"] else r["dice_mean_std"]
                series[f"full ({r['labeled']})"] = ([min(xs), max(xs)], [r["dice_mean"]] * 2, [sd] * 2)
        tmp = path + f".{len(panels)}.png"
        common.plot(tmp, series, "labelled samples", "test Dice", f"{script} ({data})", size=(480, 330),
                    dashed=[k for k in series if k.startswith("full (")])
        panels.append(Image.open(tmp).convert("RGB"))
        os.remove(tmp)
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    rows_n = -(-len(panels) // columns)
    grid = Image.new("RGB", (w * columns, h * rows_n), "white")
    for k, p in enumerate(panels):
        grid.paste(p, ((k % columns) * w, (k // columns) * h))
    grid.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders, or folders that contain run folders")
    p.add_argument("--by", nargs="+", default=KEYS, help=f"grouping keys (default: {' '.join(KEYS)})")
    p.add_argument("--data", help="only runs on this dataset")
    p.add_argument("--final", action="store_true", help="only the last round of each finished run (runs without "
                   "a readable summary.json are left out and counted)")
    p.add_argument("--out", help="folder for results.md, results.csv and curves.png")
    p.add_argument("--vs-random", action="store_true", help="with --out: also vs_random.md and curves_by_script.png "
                   "(each rule against its own script's random, and the ceiling)")
    args = p.parse_args(argv)
    missing = [path for path in args.paths if not os.path.isdir(path)]
    if missing:
        raise common.UserError(f"{missing[0]}: " + ("a file" if os.path.exists(missing[0]) else "no such folder")
                               + "; expected run folders, or folders that contain run folders")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):  # before the work, not after
        raise common.UserError(f"--out {args.out}: a file; expected a folder for results.md, results.csv and "
                               f"curves.png")
    summary = collect(args.paths, args.by, args.data, args.final)
    if not summary:
        raise common.UserError(f"no finished rounds under {' '.join(args.paths)}: expected run folders with "
                               "config.json and rounds.csv")
    cols = args.by + ["n", "dice_mean", "iou_mean"]
    heads = args.by + ["runs (n)", "Dice (mean ± sample std)", "IoU (mean ± sample std)"]
    if any(s["unfinished"] for s in summary):  # only the per-round table can hold unfinished runs
        cols, heads = cols + ["unfinished"], heads + ["of which unfinished"]
    table = common.markdown_table(summary, cols, heads)
    if "unfinished" in cols:
        table += ("\n\nunfinished: runs without a readable summary.json (still running, or crashed); their finished "
                  "rounds are in the rows above, and `--final` leaves them out.")
    print(table)
    if args.out:
        common.out_folder(args.out, "results.md, results.csv and curves.png")
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
        if "labeled" in args.by and {"script", "strategy"} <= set(args.by):
            curves(os.path.join(args.out, "curves.png"), summary, " ".join(sorted({str(r.get("data", "")) for r in summary})))
        if args.vs_random and {"script", "strategy", "data", "labeled"} <= set(args.by):
            cmp = vs_random(summary)
            cols = ["script", "data", "strategy", "labeled", "n", "rule", "random", "diff", "verdict", "ceiling"]
            with open(os.path.join(args.out, "vs_random.md"), "w") as f:
                f.write(common.markdown_table(cmp, cols, [
                    "script", "data", "rule", "labelled", "runs (rule / random)", "rule's Dice", "random's Dice",
                    "difference", "verdict (1 sample std)", "ceiling (labelled)"]) + "\n")
            curves_by_script(os.path.join(args.out, "curves_by_script.png"), summary)
        print(f"written: {args.out}/results.md, results.csv" + (", curves.png" if "labeled" in args.by else "")
              + (", vs_random.md, curves_by_script.png" if args.vs_random else ""), file=sys.stderr)
    return summary


if __name__ == "__main__":
    common.run_main(main)
