"""Behaviour record: each script's queried ids and final Dice, so that a refactor that must not change behaviour
(issue 15: the shared round loop) can be checked against the code before it.

  python benchmarks/behaviour.py --record benchmarks/behaviour.json     # before the change
  python benchmarks/behaviour.py --check benchmarks/behaviour.json      # after: exit 1 on any difference
  python benchmarks/behaviour.py --repeat --device cuda --deterministic  # the folder runs twice: the same?

Two runs per script: its no-flag run (`python SCRIPT.py`, the README's first command for each script) and one
`--data folder` run on the synthetic set written in the folder layout (a small schedule; until 0da0233 it was
width 4 and 2 + 1 epochs, whose models predicted so little that every folder run ended at Dice 0.208716). Every run gets
OMP_NUM_THREADS=2 and --device cpu, as recorded (another thread count can round differently). Another CPU can too
(docs/behaviour_checks.md): the file keeps one record per machine (`machine()`), and --check on a machine it does
not name stops at once; record the commit before a change there, then check the change against it.
tests/test_behaviour.py holds a smaller record of the same kind that the suite checks on every change.
--repeat records nothing: it runs each folder run twice on --device (with REPEAT's flags: the paths that only
some flags take) and exits 1 unless the two give the same ids and Dice, the check of --deterministic on a GPU.
--repeat --interrupt stops the second run with SIGINT (Ctrl-C) once its INTERRUPT file exists (round 0's
checkpoint; SSL: its first pre-training epoch's), goes on with --resume, and compares the result with the first run:
  python benchmarks/behaviour.py --repeat --interrupt --device cuda --deterministic   # resume on a GPU: the same?
"""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import runfolder  # noqa: E402
import torch  # noqa: E402

SCRIPTS = ["ceal_mcdropout.py", "ssl_coldstart.py", "region_uncertainty.py", "polyp_weighted_cluster.py",
           "dsal_fingerbones.py", "example_tta.py", "example_claspe.py"]
FOLDER = ["--split", 60, 10, 20, "--image-size", 32, "--width", 8, "--initial", 10, "--query", 5, "--rounds", 2,
          "--epochs-initial", 8, "--epochs", 3, "--batch-size", 8, "--lr", 0.01]
METHOD = {"ceal_mcdropout.py": ["--mc-passes", 3, "--pseudo-step", 2], "ssl_coldstart.py": ["--ssl-epochs", 1],
          "region_uncertainty.py": ["--image-size", 64, "--width", 16, "--lr", 0.03]}
REPEAT = {"polyp_weighted_cluster.py": ["--fdl-grad-through-mask"], "region_uncertainty.py": ["--partial"],
          "ssl_coldstart.py": ["--ssl-epochs", 3]}  # 3: --interrupt stops it between two epochs
INTERRUPT = {"ssl_coldstart.py": "ssl_pretrain.pt"}  # default checkpoint.pt


def runs():
    """{name: (script, args)}: the no-flag run and the folder run of every script."""
    out = {}
    for s in SCRIPTS:
        out[s] = (s, [])
        out[f"{s} --data folder"] = (s, ["--data", "folder", "--data-dir", "{folder}", *FOLDER, *METHOD.get(s, [])])
    return out


def machine():
    """Whose floats a record holds: the CPU, as a run's config.json names it, and torch's version."""
    return f"{runfolder.device_name(torch.device('cpu'))}, torch {torch.__version__}"


def record_of(run_dir):
    picks = csv.DictReader(open(os.path.join(run_dir, "queried.csv")))
    rows = csv.DictReader(open(os.path.join(run_dir, "rounds.csv")))
    return {"queried": [[r["round"], r["sample_id"], r["how"]] for r in picks], "dice": [r["dice_mean"] for r in rows]}


def run_once(name, script, flags, tmp, env, note=""):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags]
                         + ["--out", os.path.join(tmp, "runs")] * ("--resume" not in flags),
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"{name}: exit {out.returncode}\n{out.stderr[-2000:]}")
    if note:
        print(f"{name}: stopped: {note}")
    return record_of(out.stdout.strip().splitlines()[-1].rsplit(";", 1)[-1].strip())


def run_interrupted(name, script, flags, tmp, env, device):
    """Start the run, SIGINT it once its INTERRUPT file exists, then --resume it: the record at the end."""
    out, trigger = os.path.join(tmp, f"stopped{len(os.listdir(tmp))}"), INTERRUPT.get(script, "checkpoint.pt")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags, "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        while proc.poll() is None:
            dirs = os.listdir(out) if os.path.isdir(out) else []
            path = os.path.join(out, dirs[0], trigger) if dirs else ""
            if os.path.isfile(path):  # written whole or not at all (os.replace)
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        stdout, stderr = proc.communicate()
    except BaseException:  # this process stopped (Ctrl-C, timeout's SIGTERM): its run goes with it
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 130:
        sys.exit(f"{name}: expected exit 130 after SIGINT (stopped once {trigger} was written), got "
                 f"{proc.returncode}\n{stderr[-2000:]}")
    run_dir = os.path.join(out, os.listdir(out)[0])
    return run_once(name, script, ["--resume", run_dir, "--device", device], tmp, env,
                    note=stderr.strip().splitlines()[-1] if stderr.strip() else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="JSON")
    g.add_argument("--check", metavar="JSON")
    g.add_argument("--repeat", action="store_true", help="run each folder run twice and compare the two")
    p.add_argument("--only", nargs="+", help="only these run names")
    p.add_argument("--device", default="cpu", help="with --repeat (default: cpu, as recorded)")
    p.add_argument("--deterministic", action="store_true", help="with --repeat: pass --deterministic")
    p.add_argument("--interrupt", action="store_true", help="with --repeat: stop the second run with SIGINT once "
                   "round 0's checkpoint is written (SSL: its first pre-training epoch's) and go on with --resume")
    args = p.parse_args(argv)
    if args.interrupt and not args.repeat:
        p.error("--interrupt goes with --repeat")
    if set(args.only or []) - set(runs()):
        p.error(f"--only {', '.join(sorted(set(args.only) - set(runs())))}: no such run; expected some of: "
                f"{', '.join(repr(n) for n in runs())}")
    if args.check and machine() not in json.load(open(args.check)):
        p.error(f"--check {args.check}: no record for this machine ({machine()}; the file has: "
                f"{'; '.join(json.load(open(args.check)))}); another CPU can train the same runs to other floats. "
                "Record the commit before the change here (--record), then --check the change against that")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # timeout's SIGTERM cleans up as Ctrl-C does
    tmp = tempfile.mkdtemp(prefix="behaviour_")  # the data and run folders, removed at the end, stopped or not
    print(f"behaviour: one line per run as it ends (the no-flag runs take minutes each on a CPU); work in {tmp}",
          flush=True)
    try:
        code = compare(args, tmp)
    except KeyboardInterrupt:
        code = 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(code)


def compare(args, tmp):
    """The runs main() asks for, in tmp; returns the exit status."""
    folder = common.write_folder(common.make_synthetic(90, 32, 3, seed=0), os.path.join(tmp, "data"))
    result, env = {}, dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    for name, (script, flags) in runs().items():
        if args.only and name not in args.only or args.repeat and "--data" not in flags:
            continue
        flags = [str(f).replace("{folder}", folder) for f in flags]
        if args.repeat:
            flags += [*map(str, REPEAT.get(script, [])), "--device", args.device]
            flags += ["--deterministic"] * args.deterministic
        records = [run_once(name, script, flags if args.repeat else [*flags, "--device", "cpu"], tmp, env)
                   for _ in range(1 if args.interrupt or not args.repeat else 2)]
        if args.interrupt:
            records.append(run_interrupted(name, script, flags, tmp, env, args.device))
        result[name] = records[0]
        print(f"{name}: {len(records[0]['queried'])} queried rows, final Dice {records[0]['dice'][-1]}"
              + (f"; {'resumed' if args.interrupt else 'second'} run "
                 f"{'identical' if records[1] == records[0] else 'DIFFERS'}" if args.repeat else ""),
              flush=True)
        if args.repeat and records[1] != records[0]:
            result[name] = None
    if args.repeat:
        same = sum(r is not None for r in result.values())
        print(f"{same} of {len(result)} runs gave the same ids and Dice twice on {args.device}"
              f"{', the second stopped and resumed' if args.interrupt else ''}"
              f"{' with --deterministic' if args.deterministic else ''}")
        return 0 if same == len(result) else 1
    if args.record:  # this machine's record; with --only: those runs replace theirs in it
        records = json.load(open(args.record)) if os.path.isfile(args.record) else {}
        records[machine()] = {**(records.get(machine(), {}) if args.only else {}), **result}
        json.dump(records, open(args.record, "w"), indent=0)
        print(f"recorded {len(result)} runs in {args.record} for {machine()}")
        return 0
    want = json.load(open(args.check))[machine()]
    bad = [n for n in result if want.get(n) != result[n]]
    for n in bad:
        w, g = want.get(n, {}), result[n]
        print(f"DIFFERS: {n}: queried {'same' if w.get('queried') == g['queried'] else 'different'}, "
              f"Dice recorded {w.get('dice')} now {g['dice']}")
    print(f"{len(result) - len(bad)} of {len(result)} runs identical to {args.check}")
    return 1 if bad else 0


if __name__ == "__main__":
    main()
