"""Tables of finished runs: every run folder's rounds with its flags (collect_runs), grouped into mean and
sample std over seeds (summarise), printed as Markdown (markdown_table). collect.py and every script's
--tables are views of these; common re-exports them."""
import csv
import glob
import json
import math
import os
import sys
import tempfile

import numpy as np

from loaders import UserError


def read_json(path):
    with open(path) as f:
        return json.load(f)


def out_folder(path, what):
    """--out of collect.py and of a script's --tables: the folder made if missing and tried with a file, so a
    path that cannot hold `what` (a file of that name, no permission, a read-only disk) is one line, before any
    is written. Returns path."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"--out {path}: cannot write {what} there ({e.strerror}); expected a folder you can write "
                        f"to, or a path where one can be made")
    return path


def read_config(path):
    """A run folder's config.json, or None where it is not a run's config (unreadable, cut short by a crash,
    or without the script and flags a script writes): --resume and the tables both refuse it."""
    try:
        cfg = read_json(path)
    except (OSError, ValueError):  # unreadable, or not JSON
        return None
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("args"), dict) and "script" in cfg else None


def read_rows(path):  # a CSV file's rows as dicts
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collect_runs(paths):
    """One dict per finished round of every run folder under `paths` (run folders or their parents):
    the run's flags (config.json "args"), its script, folder, whether the run finished (`finished`: it
    wrote summary.json; False while it runs or after a crash), and the round's rounds.csv columns (numbers
    as floats; an empty cell stays ""). A run with a missing or empty rounds.csv contributes nothing; one whose
    config.json is missing or not a run's config (cut short by a crash, say), or whose rounds.csv is not a
    script's (not UTF-8 text, no round and labeled columns), is left out with a warning line, so that it does not
    stop the table of the others, and so are the rounds.csv lines cut short or with a cell that is not a number
    (one warning line per file). A summary.json that cannot be read leaves its run unfinished, with a
    warning line. A run named twice (`runs runs/` or `runs runs/RUN`) counts once."""
    rows, seen = [], set()
    for p in paths:
        if os.path.isfile(os.path.join(p, "config.json")):
            cfgs = [os.path.join(p, "config.json")]
        else:
            cfgs = sorted(glob.glob(os.path.join(glob.escape(p), "**", "config.json"), recursive=True))
            for rounds in sorted(glob.glob(os.path.join(glob.escape(p), "**", "rounds.csv"), recursive=True)):
                run_dir = os.path.dirname(rounds)
                if not os.path.isfile(os.path.join(run_dir, "config.json")) and os.path.realpath(run_dir) not in seen:
                    seen.add(os.path.realpath(run_dir))
                    print(f"warning: {run_dir}: rounds.csv without config.json; expected the config.json its script "
                          "writes beside it; this run is left out", file=sys.stderr)
        for cfg_path in cfgs:
            run_dir = os.path.dirname(cfg_path)
            rounds = os.path.join(run_dir, "rounds.csv")
            if not os.path.isfile(rounds) or os.path.realpath(run_dir) in seen:
                continue
            seen.add(os.path.realpath(run_dir))
            cfg = read_config(cfg_path)
            if cfg is None:
                print(f"warning: {cfg_path}: not a run's config (unreadable JSON, or no script and flags in it); "
                      "expected the config.json a script writes; this run is left out", file=sys.stderr)
                continue
            try:
                lines = read_rows(rounds)
            except (OSError, UnicodeDecodeError, csv.Error) as e:  # a damaged disk, another file under its name
                print(f"warning: {rounds}: not readable as CSV text ({type(e).__name__}); expected the rounds.csv a "
                      "script writes; this run is left out", file=sys.stderr)
                continue
            if lines and not {"round", "labeled"} <= set(lines[0]):
                print(f"warning: {rounds}: no round and labeled columns in its header line; expected the rounds.csv a "
                      "script writes; this run is left out", file=sys.stderr)
                continue
            summary = os.path.join(run_dir, "summary.json")
            try:  # a summary.json that does not parse (a damaged disk, a hand edit) does not finish its run
                finished = isinstance(read_json(summary), dict)
            except (OSError, ValueError):
                finished = False
                if os.path.exists(summary):
                    print(f"warning: {summary}: unreadable (not JSON: cut short?); expected the summary.json a script "
                          "writes at its end; the run counts as unfinished", file=sys.stderr)
            short, not_number = 0, []
            for r in lines:
                if None in r or None in r.values():  # csv.DictReader: a short line's missing fields are None
                    short += 1
                    continue
                values, bad = {}, None
                for k, v in r.items():  # every rounds.csv column is a number, or empty where not measured
                    try:
                        values[k] = v if v == "" else float(v)
                    except ValueError:
                        bad = bad or f"{k} = {v!r}"
                if bad:
                    not_number.append(bad)
                    continue
                row = dict(cfg["args"], script=cfg["script"], run=run_dir, finished=finished, flags=cfg["args"],
                           images_crc32=cfg.get("images_crc32"))
                row.update(values)
                rows.append(row)
            if short:
                print(f"warning: {rounds}: {short} line(s) without the header's {len(lines[0]) - (None in lines[0])} "
                      "fields (cut short?) are not finished rounds; left out", file=sys.stderr)
            if not_number:
                print(f"warning: {rounds}: {len(not_number)} line(s) with a cell that is not a number (first: "
                      f"{not_number[0]}); expected numbers; those lines are left out", file=sys.stderr)
    return rows


# flags that say where or how a run ran, not its setting (ssl_weights: a cached pre-training of the same protocol;
# data_dir: where a named dataset lies; for --data folder, summarise compares the images' crc32 instead)
SAME_SETTING = {"seed", "out", "resume", "tables", "data_dir", "device", "workers", "compile", "amp", "deterministic",
                "ssl_weights"}


def summarise(rows, by, values=("dice_mean",)):
    """Group rows by the keys `by` and give n, the mean and the sample standard deviation (ddof = 1) over the
    runs in each group (normally seeds) of each value: v and v_std. A group of one run has std NaN (not 0:
    one run says nothing about the spread), which markdown_table prints as the mean alone. Runs (collect_runs)
    whose flags differ beyond the seed and where or how they ran (SAME_SETTING) are never pooled: UserError;
    nor are --data folder runs on two datasets (two --data-dir folders whose images differ: config.json's
    images_crc32).
    Runs of one script and seed in one cell are pooled as any others, with a note line on stderr naming them."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(_key(r.get(k)) for k in by), []).append(r)
    for key, g in groups.items():
        flags = {r["run"]: r["flags"] for r in g if "flags" in r}
        names = set().union(*flags.values()) - set(by) - SAME_SETTING
        differ = [k for k in sorted(names) if len({repr(f.get(k)) for f in flags.values()}) > 1]
        if any(f.get("data") == "folder" for f in flags.values()) and "data_dir" not in by:
            # every user's dataset is "folder": which one, its images' crc32 says (the same set moved or copied
            # pools); where a run has none (written before it), its folder
            crcs = [r.get("images_crc32") for r in g if "flags" in r]
            which = crcs if all(crcs) else [r["flags"].get("data_dir") for r in g if "flags" in r]
            if len(set(which)) > 1:
                differ.append("data_dir")
        if differ:  # the reason first, then each setting with a few of its runs (hundreds would hide the reason)
            setting, crc = {}, {r["run"]: r.get("images_crc32") for r in g}
            shown = lambda run, f, k: f"--{k.replace('_', '-')} {f.get(k)!r}" + (
                f" (images crc32 {crc[run]})" if k == "data_dir" and crc.get(run) else "")
            for run, f in sorted(flags.items()):
                setting.setdefault(" ".join(shown(run, f, k) for k in differ), []).append(run)
            lines = [f"{s}: {len(runs)} run(s): {', '.join(runs[:3])}" + f" and {len(runs) - 3} more" * (len(runs) > 3)
                     for s, runs in sorted(setting.items())]
            lines = lines[:10] + [f"and {len(lines) - 10} more setting(s)"] * (len(lines) > 10)
            raise UserError(f"runs of one table cell ({dict(zip(by, key))}) ran with other "
                            f"{', '.join('--' + k.replace('_', '-') for k in differ)}; expected one setting per cell: "
                            "collect each setting's folders apart (or, in collect.py, add the flag to --by)"
                            + "".join("\n  " + line for line in lines))
    again, cells = {}, {}  # where one seed ran more than once in a cell: its runs, and how many cells they share
    for key, g in groups.items():
        for r in g:
            again.setdefault((key, r.get("script"), r.get("seed")), set()).add(r["run"])
    for (key, _, seed), runs in again.items():
        if len(runs) > 1 and seed is not None:
            cells[seed, tuple(sorted(runs))] = cells.get((seed, tuple(sorted(runs))), 0) + 1
    if len(cells) > 5:
        print(f"note: {len(cells) - 5} more seed(s) ran more than once; the first 5 follow", file=sys.stderr)
    for (seed, runs), n in sorted(cells.items(), key=repr)[:5]:
        print(f"note: seed {seed!r} ran {len(runs)} times: {', '.join(runs[:3])}{' and more' * (len(runs) > 3)}; "
              f"each run counts in n and the std of the {n} table cell(s) they share (on a CPU a repeated seed "
              "gives the same numbers; on a GPU only its nondeterminism differs)", file=sys.stderr)
    out = []
    number = lambda x: isinstance(x, (int, float))  # numbers by value, the rest (a hand-edited seed "1") as text
    for key in sorted(groups, key=lambda t: tuple((x is None, not number(x), x if number(x) else str(x)) for x in t)):
        g = groups[key]
        row = dict(zip(by, key), n=len(g))
        for v in values:
            a = np.array([float(r[v]) for r in g if r.get(v) not in (None, "")], float)
            row[v] = float(a.mean()) if len(a) else float("nan")
            row[v + "_std"] = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
        out.append(row)
    return out


# the flags that make a protocol: one_schedule
SCHEDULE = ["initial", "query", "rounds", "epochs_initial", "epochs", "batch_size", "lr", "width", "image_size",
            "split"]


def one_schedule(rows, what):
    """A table that compares methods under one protocol (a paper's Table 1, a Fig. 4 curve): every run of `rows`
    with the same SCHEDULE flags, or a UserError naming each schedule and one of its runs. summarise keeps two
    settings out of one cell; this keeps them out of one row or curve, where their cells sit at other counts."""
    differ = [k for k in SCHEDULE if len({repr(r["flags"].get(k)) for r in rows}) > 1]
    if differ:
        runs = {" ".join(f"--{k.replace('_', '-')} {r['flags'].get(k)}" for k in differ): r["run"] for r in rows}
        raise UserError(f"--tables: the {what} runs follow {len(runs)} schedules; a table compares the methods under "
                        "one: give the folders of one schedule" + "".join(f"\n  {s}: e.g. {run}"
                                                                          for s, run in sorted(runs.items())))


def _key(v):
    return tuple(v) if isinstance(v, list) else (int(v) if isinstance(v, float) and v.is_integer() else v)


def markdown_table(rows, columns, headers=None):
    """rows: dicts; a column "x" whose row also has "x_std" prints as mean ± std (summarise's sample std;
    the mean alone where the row has n = 1 or the std is NaN). Give the table an "n" column so that a reader
    sees how many runs each ± is over."""
    def cell(r, c):
        v = r.get(c, "")
        if isinstance(v, float):
            sd = r.get(c + "_std")
            ok = isinstance(sd, (int, float)) and math.isfinite(sd) and r.get("n", 1) > 1
            return f"{v:.4f} ± {sd:.4f}" if ok else f"{v:.4f}"
        return str(v)
    head = headers or columns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
