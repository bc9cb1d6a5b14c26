"""The project's interface check: what every script promises a user, checked on its --help and on a finished
run folder. The project's own (it used to live beside the project, in the shared folder's check_run.py, which
a fresh clone does not have), with the same checks and more.

  check_help(script)                              -> [problems]   the shared flags, in the agreed order
  check_run(run_dir, pool_scores=True, picks=True) -> [problems]   the run folder's files and columns
  assert_interface(script, run_dir, ...)          asserts both are empty, listing every problem

pool_scores / picks switch off the checks of the per-round files pool_scores.csv (common.Run.log_pool_scores)
and picks/round_<K>.png (common.save_picks) for scripts that do not write them yet.

The lists below are written out here on purpose, not imported from common.py: a check that reads the agreed
interface from the code under test would follow that code wherever it went.

Also a command line: python tests/interface.py SCRIPT.py [RUN_DIR] [--no-pool-scores] [--no-picks]
"""
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shared flags, in the order every script's --help lists them (common.shared_parser).
SHARED_FLAGS = ["--data", "--data-dir", "--image-size", "--seed", "--device", "--amp", "--out", "--resume",
                "--strategy", "--initial", "--query", "--rounds", "--epochs-initial", "--epochs",
                "--batch-size", "--lr", "--width"]
# rounds.csv: these columns first, in this order (a script may add its own after them).
ROUND_COLUMNS = ["round", "labeled", "pseudo", "dice_mean", "dice_std", "iou_mean", "train_s", "select_s"]
QUERIED_COLUMNS = ["round", "sample_id", "how"]
RUN_FILES = ["config.json", "splits.json", "rounds.csv", "queried.csv", "summary.json", "checkpoint.pt",
             "learning_curve.png", "panel.png"]
PNG = b"\x89PNG\r\n\x1a\n"


def _how_ok(rnd, how):
    """queried.csv's how: round 0's seeded random set "initial" (the whole pool "full"), a query "oracle-<rule>"
    (ssl_coldstart's cold start too, at round 0), "pseudo" for the model's own labels (CEAL)."""
    return how in (("initial", "full") if rnd == "0" else ()) or how == "pseudo" or how.startswith("oracle-")


# ------------------------------------------------------------------------------------------------ --help
def help_text(script, in_process=True):
    """The script's --help. In this process (the script's parser; no second import of torch) unless
    in_process=False, which runs `python SCRIPT --help` as a user does."""
    path = script if os.path.isabs(script) else os.path.join(ROOT, script)
    if in_process:
        name = os.path.splitext(os.path.basename(path))[0]
        if os.path.dirname(os.path.abspath(path)) == ROOT:  # a project script: the module the tests import
            if ROOT not in sys.path:
                sys.path.insert(0, ROOT)
            mod = importlib.import_module(name)
        else:
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        entry = getattr(mod, "parse_args", None) or mod.main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                entry(["--help"])
            except SystemExit as e:
                if e.code not in (0, None):
                    return None, f"`{script} --help` exited {e.code}"
            else:
                return None, f"`{script} --help` returned instead of printing the help and exiting"
        return buf.getvalue(), None
    out = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, COLUMNS="100"))
    if out.returncode:
        return None, f"`{script} --help` exited {out.returncode}: {out.stderr.strip()[-300:]}"
    return out.stdout, None


def check_help(script, in_process=True):
    """Every shared flag in --help, as an option (not only mentioned in a help string), in the agreed order."""
    text, error = help_text(script, in_process)
    if error:
        return [error]
    where = {}
    for flag in SHARED_FLAGS:  # the line that defines the option: "  --flag ..." or "  -x, --flag ..."
        m = re.search(rf"^\s+(?:-\w+,\s+)?{re.escape(flag)}(?![\w-])", text, re.M)
        if m:
            where[flag] = m.start()
    problems = [f"{script}: flag {f} missing from --help" for f in SHARED_FLAGS if f not in where]
    found = [f for f in SHARED_FLAGS if f in where]
    if [where[f] for f in found] != sorted(where[f] for f in found):
        shown = " ".join(sorted(found, key=where.get))
        problems.append(f"{script}: shared flags not in the agreed order {' '.join(SHARED_FLAGS)} (got {shown})")
    return problems


# -------------------------------------------------------------------------------------------- run folder
def _csv(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def nan(v):
    """Not measured: nan in a CSV, null (None) in JSON."""
    return v is None or v != v


def _json(run, name):
    """A run file's JSON object, or {} where it is missing or unreadable (check_run names that itself)."""
    try:
        obj = json.load(open(os.path.join(run, name)))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def check_run(run, pool_scores=True, picks=True):
    """Problems with a finished run folder (an empty list when it keeps the interface)."""
    if not os.path.isdir(run):
        return [f"{run}: no such folder"]
    p = []
    # --oracle folder on a folder of images only: no masks, so no test set and no test images for the panel
    unmasked = _json(run, "config.json").get("args", {}).get("oracle") == "folder" and _json(run, "splits.json").get(
        "test") == []
    for name in RUN_FILES:
        if unmasked and name == "panel.png":
            continue
        path = os.path.join(run, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            p.append(f"{run}: no {name}" if not os.path.isfile(path) else f"{run}: {name} is empty")
        elif name.endswith(".png") and open(path, "rb").read(8) != PNG:
            p.append(f"{run}: {name} is not a PNG")
    have = lambda name: os.path.isfile(os.path.join(run, name)) and os.path.getsize(os.path.join(run, name)) > 0

    cfg = splits = None
    if have("config.json"):
        cfg = json.load(open(os.path.join(run, "config.json")))
        p += [f"config.json lacks {k}" for k in ("script", "args") if k not in cfg]
    if have("splits.json"):
        splits = json.load(open(os.path.join(run, "splits.json")))
        missing = [k for k in ("train", "val", "test") if not isinstance(splits.get(k), list)]
        p += [f"splits.json lacks the list {k}" for k in missing]
        if not missing:
            sets = {k: set(map(str, splits[k])) for k in ("train", "val", "test")}
            if sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"]:
                p.append("splits.json: train, val and test overlap")
            if not splits["train"] or not (splits["test"] or unmasked):
                p.append("splits.json: no training or no test samples")
    train = set(map(str, splits["train"])) if splits and isinstance(splits.get("train"), list) else None

    rounds = []
    if have("rounds.csv"):
        cols, rows = _csv(os.path.join(run, "rounds.csv"))
        p += [f"rounds.csv lacks column {c}" for c in ROUND_COLUMNS if c not in cols]
        if all(c in cols for c in ROUND_COLUMNS) and cols[:len(ROUND_COLUMNS)] != ROUND_COLUMNS:
            p.append(f"rounds.csv: the columns {' '.join(ROUND_COLUMNS)} do not come first, in this order")
        if not rows:
            p.append("rounds.csv has no rows")
        elif "round" in cols:
            rounds = [int(_num(r["round"])) if _num(r["round"]) is not None else None for r in rows]
            if rounds != list(range(len(rows))):
                p.append(f"rounds.csv: rounds {rounds}, expected 0..{len(rows) - 1} once each")
            for k, r in enumerate(rows):
                bad = [c for c in ("labeled", "pseudo", "dice_mean", "iou_mean", "train_s", "select_s")
                       if c in r and (_num(r[c]) is None or _num(r[c]) < 0)]
                bad += [c for c in ("dice_mean", "iou_mean") if c in r and (_num(r[c]) or 0) > 1]
                if bad:
                    p.append(f"rounds.csv row {k}: bad {', '.join(bad)} ({', '.join(str(r[c]) for c in bad)})")
            labeled = [_num(r.get("labeled")) for r in rows]
            if None not in labeled and labeled != sorted(labeled):
                p.append(f"rounds.csv: the labelled count shrinks ({labeled})")
        if rows and have("summary.json"):
            summary = json.load(open(os.path.join(run, "summary.json")))
            final, last = _num(summary.get("final_dice")), _num(rows[-1].get("dice_mean"))
            if "final_dice" not in summary:
                p.append("summary.json lacks final_dice")
            elif nan(final) != nan(last) or not nan(final) and abs(final - last) > 1e-4:  # no test set: both nan
                p.append(f"summary.json: final_dice {summary['final_dice']} is not the last round's dice_mean "
                         f"{rows[-1].get('dice_mean')}")
    elif have("summary.json") and "final_dice" not in json.load(open(os.path.join(run, "summary.json"))):
        p.append("summary.json lacks final_dice")

    queried = {}
    if have("queried.csv"):
        cols, rows = _csv(os.path.join(run, "queried.csv"))
        p += [f"queried.csv lacks column {c}" for c in QUERIED_COLUMNS if c not in cols]
        if all(c in cols for c in QUERIED_COLUMNS):
            ids = [r["sample_id"] for r in rows]
            oracle = [r["sample_id"] for r in rows if "pseudo" not in r["how"]]  # pseudo-labels may be re-drawn
            if len(oracle) != len(set(oracle)):
                p.append("queried.csv: a sample was queried twice")
            if train is not None and not set(ids) <= train:
                p.append(f"queried.csv: ids outside the training split: {sorted(set(ids) - train)[:5]}")
            hows = sorted({r["how"] for r in rows if not _how_ok(r["round"], r["how"])})
            if hows:
                p.append(f"queried.csv: how {hows}, expected round 0's initial or full, oracle-<rule> or pseudo")
            for r in rows:
                queried.setdefault(r["round"], set()).add(r["sample_id"])
            if rounds and not {int(k) for k in queried} <= set(rounds):
                p.append(f"queried.csv: rounds {sorted(int(k) for k in queried)} not all in rounds.csv")

    later = [r for r in rounds if r is not None and r > 0]  # rounds that queried by the rule
    if pool_scores and later:
        path = os.path.join(run, "pool_scores.csv")
        if not os.path.isfile(path):
            p.append(f"{run}: no pool_scores.csv (rounds {later} queried)")
        else:
            cols, rows = _csv(path)
            random = (cfg or {}).get("args", {}).get("strategy") == "random"  # a baseline may have no score
            if cols[:2] != ["round", "sample_id"] or cols[-1:] != ["picked"] or len(cols) < (3 if random else 4):
                p.append(f"pool_scores.csv: columns {cols}, expected round, sample_id, "
                         f"{'any score columns' if random else 'a score or more'}, picked")
            else:
                seen = {}
                for r in rows:
                    seen.setdefault(r["round"], []).append(r)
                got = sorted(int(k) for k in seen)
                if got != later and got != [0] + later:  # round 0 too where the base set has a rule (ssl_coldstart)
                    p.append(f"pool_scores.csv: rounds {got}, expected {later}")
                for rnd, rs in seen.items():
                    ids = [r["sample_id"] for r in rs]
                    if len(ids) != len(set(ids)):
                        p.append(f"pool_scores.csv round {rnd}: a sample scored twice")
                    if train is not None and not set(ids) <= train:
                        p.append(f"pool_scores.csv round {rnd}: ids outside the training split")
                    picked = {r["sample_id"] for r in rs if r["picked"] not in ("", "0")}
                    if queried and picked != queried.get(rnd, set()):
                        p.append(f"pool_scores.csv round {rnd}: {len(picked)} picked, not the {len(queried.get(rnd, ()))}"
                                 f" queried.csv lists for the round")
    if picks and later:
        folder = os.path.join(run, "picks")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for rnd in later:
            path = os.path.join(folder, f"round_{rnd}.png")
            if not os.path.isfile(path):
                p.append(f"{run}: no picks/round_{rnd}.png")
            elif open(path, "rb").read(8) != PNG:
                p.append(f"picks/round_{rnd}.png is not a PNG")
        stray = [n for n in names if not re.fullmatch(r"round_\d+\.png", n) or int(n[6:-4]) not in rounds]
        if stray:
            p.append(f"picks/: files that name no round of rounds.csv: {stray}")
    return p


def assert_interface(script, run_dirs, pool_scores=True, picks=True, help=True):
    """Assert the script's --help (once) and every run folder in run_dirs keep the interface."""
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    problems = check_help(script) if help else []
    for run in run_dirs:
        problems += check_run(str(run), pool_scores=pool_scores, picks=picks)
    assert not problems, f"{script}: the interface check found:\n  " + "\n  ".join(problems)


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--no-")]
    if not argv:
        sys.exit(__doc__)
    problems = check_help(argv[0], in_process=False)
    for run in argv[1:]:
        problems += check_run(run, "--no-pool-scores" not in sys.argv, "--no-picks" not in sys.argv)
    print("\n".join(problems) if problems else "interface ok")
    sys.exit(1 if problems else 0)
