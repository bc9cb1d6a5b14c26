"""Collect run folders of any script into one results table and one learning-curve figure.

Groups the finished rounds of every run by script, strategy, dataset and labelled count, and writes Dice
and IoU as mean ± sample std (ddof = 1) over the n runs in each group (normally seeds): results.md,
results.csv and curves.png (test Dice against labelled samples, ±1 std bands). A run without summary.json
(still running, or crashed) is unfinished: its rounds count in the per-round table, which says how many
runs of each row are unfinished, and --final leaves it out (its last round is not a final result). The paper-specific tables of each script
(`SCRIPT.py --tables RUN_DIR ...`) are views of the same collector (common.collect_runs / summarise).

  python collect.py runs/                                    # print the table of every run under runs/
  python collect.py runs/ --out results/synthetic            # also write results.md, results.csv, curves.png
  python collect.py runs/ --data lgg --by script strategy --final   # only LGG runs; final round per finished run
"""
import argparse
import csv
import os
import sys

import common

KEYS = ["script", "strategy", "data", "labeled"]


def collect(paths, by=KEYS, data=None, final=False):
    """summarise's rows (n, mean and sample std of Dice and IoU per group), each with `unfinished`: how many
    of its runs have no summary.json. final: only the last round of each finished run; the unfinished runs
    are left out (and counted on stderr)."""
    rows = common.collect_runs(paths)
    if data:
        rows = [r for r in rows if r.get("data") == data]
    if final:  # only the last round of each finished run
        left_out = sorted({r["run"] for r in rows if not r["finished"]})
        if left_out:
            print(f"--final: left out {len(left_out)} unfinished run(s) (no summary.json: still running or crashed): "
                  + ", ".join(left_out), file=sys.stderr)
        last = {}
        for r in rows:
            if r["finished"]:
                last[r["run"]] = r
        rows = list(last.values())
    summary = common.summarise(rows, by, values=("dice_mean", "iou_mean"))
    unfinished = {}
    for r in rows:
        if not r["finished"]:
            unfinished.setdefault(tuple(common._key(r.get(k)) for k in by), set()).add(r["run"])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders, or folders that contain run folders")
    p.add_argument("--by", nargs="+", default=KEYS, help=f"grouping keys (default: {' '.join(KEYS)})")
    p.add_argument("--data", help="only runs on this dataset")
    p.add_argument("--final", action="store_true", help="only the last round of each finished run (runs without "
                   "summary.json are left out and counted)")
    p.add_argument("--out", help="folder for results.md, results.csv and curves.png")
    args = p.parse_args(argv)
    summary = collect(args.paths, args.by, args.data, args.final)
    if not summary:
        raise common.UserError(f"no finished rounds (rounds.csv) under {' '.join(args.paths)}")
    cols = args.by + ["n", "dice_mean", "iou_mean"]
    heads = args.by + ["runs (n)", "Dice (mean ± sample std)", "IoU (mean ± sample std)"]
    if any(s["unfinished"] for s in summary):  # only the per-round table can hold unfinished runs
        cols, heads = cols + ["unfinished"], heads + ["of which unfinished"]
    table = common.markdown_table(summary, cols, heads)
    if "unfinished" in cols:
        table += ("\n\nunfinished: runs without summary.json (still running, or crashed); their finished rounds "
                  "are in the rows above, and `--final` leaves them out.")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "results.md"), "w").write(table + "\n")
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
        if "labeled" in args.by and {"script", "strategy"} <= set(args.by):
            curves(os.path.join(args.out, "curves.png"), summary, " ".join(sorted({str(r.get("data", "")) for r in summary})))
        print(f"written: {args.out}/results.md, results.csv" + (", curves.png" if "labeled" in args.by else ""),
              file=sys.stderr)
    return summary


if __name__ == "__main__":
    common.run_main(main)
