"""The run folder: runs/<script>__<data>__<strategy>__s<seed>__<time>/ and everything written into it (config.json,
splits.json, the per-round CSVs, checkpoint.pt, run.lock, summary.json), --resume, and run_main, which turns bad
input into one line. The scripts reach it through common (common.Run, common.run_main, common.ROUND_COLUMNS).
"""
import csv
import datetime
import errno
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

try:
    import fcntl  # run.lock (Run.take_lock); absent on Windows, where a run folder is not locked
except ImportError:
    fcntl = None

import numpy as np
import PIL
import torch

from loaders import UserError
from plots import learning_curve
from tables import read_config, read_json, read_rows

ROUND_COLUMNS = ["round", "labeled", "pseudo", "dice_mean", "dice_std", "iou_mean", "train_s", "select_s"]


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:  # fail loudly (RuntimeError naming the op) on an op with no deterministic implementation
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it, before its first use
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:  # also undoes an earlier --deterministic call in the same process (in-process tests)
        if torch.are_deterministic_algorithms_enabled():  # the call itself costs ~1.3 s of CPU: only when needed
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def get_device(name="auto"):
    works = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if works[kind]))
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}")
    if dev.type not in works:  # xpu, hip, meta...: types torch names, which this code never runs on
        raise UserError(f"--device {name}: expected auto, cuda (or cuda:N), mps or cpu")
    if not works[dev.type]:
        raise UserError(f"--device {name}: {dev.type.upper()} is not available on this machine (try --device cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return dev


def run_main(main):
    """Run a script's main(); a UserError is one line on stderr and exit status 2, running out of memory or a
    run folder that cannot be written one line and status 1 (a new run folder holding only its config and split
    is removed); Ctrl-C or SIGTERM (a cluster's time limit) names the folder to --resume."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM raises KeyboardInterrupt, as Ctrl-C
    Run.made = Run.used = None  # set by this main()'s Run
    try:
        main()
    except (UserError, MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, (UserError, MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise  # (the last: the CPU allocator's plain RuntimeError, "DefaultCPUAllocator: can't allocate memory")
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
        else:  # the data at --image-size, or a batch, beyond this machine's memory or the GPU's
            print(f"error: out of memory ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); start a "
                  "new run with a lower --batch-size or --image-size (--resume keeps the run's)", file=sys.stderr)
        if Run.made and set(os.listdir(Run.made)) <= {"config.json", "splits.json", "run.lock"}:
            shutil.rmtree(Run.made)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except OSError as e:  # the run folder cannot be written: a full disk or quota, a read-only file
        inside = os.path.abspath(str(e.filename or "/")).startswith(os.path.abspath(Run.used or "/") + os.sep)
        if not (Run.used and (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
                              or inside and e.errno in (errno.EACCES, errno.EPERM))):
            raise
        saved = os.path.isfile(os.path.join(Run.used, "checkpoint.pt"))
        print(f"error: cannot write {e.filename or 'in ' + Run.used} ({e.strerror}); "
              + ("finished rounds are saved" if saved else "no round finished yet")
              + f": make room or allow writing, then --resume {shlex.quote(Run.used)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        saved = Run.used and os.path.isfile(os.path.join(Run.used, "checkpoint.pt"))  # what --resume continues from
        kept = [n for n in sorted(os.listdir(Run.used)) if n.endswith(".pt")] if Run.used and not saved else []
        done = "finished rounds are saved" if saved else "no round finished yet: round 0 starts again" + (
            f" ({', '.join(kept)} kept: --resume goes on from it)" if kept else "")  # e.g. SSL's pre-training
        print("interrupted" + (f": {done}; continue with --resume {shlex.quote(Run.used)}" if Run.used else ""),
              file=sys.stderr)
        sys.exit(130)
    finally:  # the process may live on (a notebook catches SystemExit): a later --resume must find it free
        Run.release_lock()


def device_name(device):
    """The card's name, or the CPU's: vendor, family and model (/proc/cpuinfo, Linux; else what platform says) and
    the instruction set torch's CPU kernels use. Two CPUs can train the same run to other floats, so other picks
    and Dice from the first round on (docs/behaviour_checks.md): config.json says which one a run had."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = {}
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip() and cpu:
                    break  # the first processor's block
                key, _, value = line.partition(":")
                cpu.setdefault(key.strip(), value.strip())
    name = (f"{cpu['vendor_id']} family {cpu.get('cpu family')} model {cpu.get('model')}" if "vendor_id" in cpu
            else platform.processor() or platform.machine())
    return f"{platform.machine()} {name}, {torch.backends.cpu.get_cpu_capability()}"


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except Exception:
        return None


class Run:
    """The run folder runs/<script>__<data>__<strategy>__s<seed>__<time>/ and everything written into it.

    config.json (every resolved flag, versions, device), splits.json (sample ids), rounds.csv (one row per
    finished round), queried.csv (round, sample id, how it was labelled), epochs.csv, summary.json,
    checkpoint.pt (everything --resume needs) and the figures."""
    made = used = None  # the folder this process made, the one it writes (run_main's messages)
    lock = None  # the open run.lock of the run this process writes (take_lock)

    def __init__(self, script, args, device, parse_args=None):
        self.script = os.path.splitext(os.path.basename(script))[0]
        typed = vars(args).pop("_typed", [])
        if getattr(args, "data_dir", None):  # absolute, so that --resume works from any folder
            args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
        if args.resume == "":  # an empty $R: not a new run in the current folder
            raise UserError("--resume '': expected a run folder (an empty shell variable?)")
        if args.resume:
            self.dir = args.resume
            cfg_path = os.path.join(self.dir, "config.json")
            if not os.path.isfile(cfg_path):
                raise UserError(f"--resume {self.dir}: " + ("no config.json there" if os.path.isdir(self.dir) else
                                "a file" if os.path.exists(self.dir) else "no such folder")
                                + "; expected a run folder this script wrote")
            cfg = read_config(cfg_path)
            if cfg is None:
                raise UserError(f"--resume {cfg_path}: not a run's config (unreadable JSON, or no script and flags "
                                f"in it); expected a run folder this script wrote")
            if cfg.get("script") != self.script:
                raise UserError(f"--resume {self.dir}: the run was made by {cfg.get('script')}, not {self.script}")
            self.take_lock()  # before anything of the run is read further or changed
            # the run's own flags win, --amp included (the rest of a run computes as its start did), and its
            # thread count (CPU sums depend on it); only --resume, --device, --workers and --data-dir (the data
            # moved: split_data checks it holds the run's samples) may change
            free = ("resume", "device", "workers") + (("data_dir",) if "data_dir" in typed else ())
            ignored = [k for k in typed if k not in free and k in cfg["args"]
                       and getattr(args, k) != cfg["args"][k]]
            if ignored:
                print(f"resume: {' '.join('--' + k.replace('_', '-') for k in ignored)} ignored: {self.dir} keeps the "
                      f"flags it started with (its config.json), and a run keeps its numerics")
            threads = cfg.get("threads")
            if threads is not None and not (type(threads) is int and threads >= 1):
                raise UserError(f"{cfg_path}: \"threads\": {threads!r}, expected a whole number of threads >= 1 (a "
                                f"hand edit? correct it, or start a new run)")
            if threads and threads != torch.get_num_threads() and cfg.get("device") == "cpu" and device.type == "cpu":
                if threads <= (os.cpu_count() or 1):
                    print(f"resume: {threads} threads, as the run started with (not {torch.get_num_threads()}): the "
                          f"same CPU sums, the same picks")
                    torch.set_num_threads(threads)
                else:
                    print(f"resume: the run started with {threads} threads, more than this machine's "
                          f"{os.cpu_count()} cores; on {torch.get_num_threads()}, its sums may round differently")
            for k, v in cfg["args"].items():
                if k not in free:
                    setattr(args, k, v)
            if parse_args:  # the run's flags pass the checks a new run's pass (a hand edit, a damaged file)
                given = {k: v for k, v in vars(args).items() if k in cfg["args"] or k in free or k in typed}
                try:
                    checked = vars(parse_args(given))  # common.Parser takes a dict of values
                except UserError as e:
                    raise UserError(f"{cfg_path}: {e} (the run's own flags, its \"args\": a hand edit? correct it, or "
                                    f"start a new run)")
                missing = [k for k in checked if k not in cfg["args"] and not k.startswith("_")]
                if missing:  # a flag added since the run started: as a new run gets it (or as typed now)
                    print(f"note: {cfg_path} has no {', '.join(missing)} (a run of an older version?): "
                          + ", ".join(f"{k} {checked[k]!r}" for k in missing))
                vars(args).update({k: v for k, v in checked.items() if not k.startswith("_")})
        else:
            if not args.out.strip():  # "" would put the run in the current folder, often the project's clone
                raise UserError(f"--out {args.out!r}: expected a folder to hold the run folder (default: runs)")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = f"{self.script}__{args.data}__{args.strategy}__s{args.seed}__{stamp}"
            self.dir = os.path.join(args.out, name)
            for k in range(2, 10 ** 6):  # -2, -3, ...: another run of these flags started in the same second
                try:
                    os.makedirs(self.dir)
                    break
                except FileExistsError:  # made between a check and makedirs too (a job array starting at once)
                    self.dir = os.path.join(args.out, f"{name}-{k}")
                except OSError as e:
                    raise UserError(f"--out {args.out}: cannot make the run folder {self.dir} ({e.strerror})")
            Run.made = self.dir
            self.take_lock()
            cfg = {"script": self.script, "args": vars(args), "command": " ".join(sys.argv), "commit": git_commit(),
                   "device": str(device), "device_name": device_name(device),
                   "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
                   "numpy": np.__version__, "pillow": PIL.__version__,  # Pillow decodes and resizes the images
                   "started": datetime.datetime.now().isoformat(timespec="seconds")}
            self.write_json("config.json", cfg)
        self.args, self.device, self.t0, self.offset_s = args, device, time.time(), 0.0
        Run.used = self.dir

    def take_lock(self):
        """run.lock: one process writes a run folder at a time, so a --resume beside a live process still writing
        the run (a requeued cluster job beside the old one) stops instead of mixing two runs' rounds. The lock is
        the OS's (flock), freed however the process ends, SIGKILL included; the file's text names the holder."""
        Run.release_lock()  # this process's previous run: a Run of the same process takes its own lock over
        if fcntl is None:
            return
        path, f = self.path("run.lock"), None
        try:
            f = open(path, "a+")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if f is None:
                raise UserError(f"{path}: cannot write in the run folder ({e.strerror})")
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # a file system without locks
                print(f"note: {path}: no lock on this file system ({e.strerror}); run one process per run folder")
                return
            with open(path) as g:
                holder = g.read().strip() or "a process"
            raise UserError(f"--resume {self.dir}: {holder} is writing this run now (run.lock); two processes on one "
                            f"run folder would mix their rounds. Wait for it to end, or stop it, then --resume again "
                            f"(a process on a machine that crashed: wait a minute, or remove run.lock)")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {platform.node() or 'this machine'}, started "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        f.flush()
        Run.lock = f

    @staticmethod
    def release_lock():
        """Free run.lock where this process stops writing its run (finished, or stopped to be resumed)."""
        if Run.lock is not None:
            Run.lock.close()
            Run.lock = None

    # ---- the round loop's plumbing, called by every script in the same place and the same words ----
    @classmethod
    def start(cls, script, args, parse_args=None):
        """Run start: the device, the seeds, the run folder (a new one, or --resume's: its config.json's flags,
        checked again by the script's parse_args). Returns (run, device)."""
        device = get_device(args.device)
        run = cls(script, args, device, parse_args)
        seed_everything(args.seed, args.deterministic)  # after Run: on --resume, the run's own seed and flags
        return run, device

    def resume(self, model, opt, rng, gen):
        """--resume: the model, optimiser and RNG states of the last finished round are restored. Returns
        (the first round still to run, the checkpoint) - the script takes its own sets from the checkpoint -
        or (0, None) for a new run."""
        state = self.load_checkpoint(reads=("model", "opt", "rng_select", "rng_batches"))
        if state is None:
            return 0, None
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. size mismatch for up.0.weight
            raise UserError(f"{self.path('checkpoint.pt')}: does not fit the model its config.json builds "
                            f"({(str(e).splitlines() or [''])[-1].strip()[:160]}); config.json edited, or checkpoint.pt "
                            f"from another run? Restore them, or start a new run")
        rng.bit_generator.state = state["rng_select"]
        gen.set_state(state["rng_batches"])
        return state["round"] + 1, state

    def end_round(self, row, queried, progress, model, opt, rng, gen, **sets):
        """End of a round: its row of rounds.csv and its queried ids (written first, so nothing finished is
        lost), the checkpoint (model, optimiser, RNG states and the script's sets, e.g. labeled=, pool=),
        the learning curve and the progress line. Returns rounds.csv's rows so far."""
        self.log_round(row, queried)
        self.save_checkpoint({"round": row["round"], "model": model.state_dict(), "opt": opt.state_dict(), **sets,
                              "rng_select": rng.bit_generator.state, "rng_batches": gen.get_state(),
                              "queried_rows": len(self.read_csv("queried.csv"))})
        rows = self.read_csv("rounds.csv")
        learning_curve(self.path("learning_curve.png"), rows, self.args.strategy,
                       f"{self.script} on {self.args.data}")
        progress.round(row)
        return rows

    def finish(self, summary=None, line=""):
        """The end of a run: summary.json (the last round's Dice, IoU and sets, the script's own summary entries,
        the wall time and, on a GPU, the most memory this process allocated there) and the last line, 'done: ...;
        RUN_DIR'. Returns the run folder."""
        rows = self.read_csv("rounds.csv")
        last = rows[-1]
        gpu = {"peak_device_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30} if self.device.type == "cuda" else {}
        self.write_json("summary.json", {
            "final_dice": float(last["dice_mean"]), "final_dice_std": float(last["dice_std"]),
            "final_iou": float(last["iou_mean"]), "labeled": int(last["labeled"]), "pseudo": int(last["pseudo"]),
            "rounds": len(rows) - 1, **(summary or {}), "wall_s": self.elapsed(), **gpu})
        print(f"done: test dice {float(last['dice_mean']):.4f}{line} with {last['labeled']} labelled; {self.dir}")
        self.release_lock()
        return self.dir

    def update_config(self, args):
        """Record flags derived after the run folder was made (split, initial, query from the data); the
        "resume" a later process was given is not a flag of the run (a resume that stops changes nothing)."""
        cfg = read_json(self.path("config.json"))
        self.write_json("config.json", dict(cfg, args=dict(vars(args), resume=cfg["args"].get("resume"))))

    def path(self, name):
        return os.path.join(self.dir, name)

    def write_json(self, name, obj):
        tmp = self.path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_finite(obj), f, indent=1,
                      default=lambda o: _finite(o.tolist()) if hasattr(o, "tolist") else str(o))
        os.replace(tmp, self.path(name))

    def append_csv(self, name, rows, columns=None):
        """Append one row (a dict) or several (a list); the header is written with the first row."""
        rows = [rows] if isinstance(rows, dict) else list(rows)
        if not rows:
            return
        path = self.path(name)
        new = not os.path.isfile(path) or not os.path.getsize(path)  # or made, then killed before its header
        with open(path, "a", newline="") as f:  # "\n" line ends in every CSV (csv's default is "\r\n")
            w = csv.DictWriter(f, fieldnames=columns or list(rows[0]), lineterminator="\n")
            if new:
                w.writeheader()
            w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)

    def read_csv(self, name):
        return read_rows(self.path(name)) if os.path.isfile(self.path(name)) else []

    def truncate_csv(self, name, last, column="round"):
        """On resume: keep only the whole rows whose column is at most last (drop the rows of a round, or SSL's
        epoch, that did not finish, and a row cut short); last None keeps none. The file is replaced whole (a copy,
        then os.replace), so a kill meanwhile loses no finished row."""
        rows, kept = self.read_csv(name), []
        for line, r in enumerate(rows, 2):
            if last is None or None in r.values():  # None: a field missing, or one too many (a row cut short)
                continue
            try:
                n = int(r.get(column))
            except (TypeError, ValueError):  # a hand edit: say so, rather than a traceback
                raise UserError(f"{self.path(name)}: line {line}: {column} = {r.get(column)!r}, not a whole number; "
                                f"expected the rows the run wrote (a hand edit?): restore the file") from None
            if n <= last:
                kept.append(r)
        if len(kept) == len(rows):
            return
        tmp = self.path(name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")  # as append_csv
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, self.path(name))

    def log_round(self, row, queried=None):
        """Write a finished round: its rows in rounds.csv and queried.csv, before anything else happens."""
        assert all(c in row for c in ROUND_COLUMNS), f"round row lacks {set(ROUND_COLUMNS) - set(row)}"
        self.append_csv("rounds.csv", row, ROUND_COLUMNS + [c for c in row if c not in ROUND_COLUMNS])
        if not os.path.isfile(q := self.path("queried.csv")) or not os.path.getsize(q):  # a header even if none (full)
            with open(q, "w") as f:
                f.write("round,sample_id,how\n")
        self.append_csv("queried.csv", [{"round": row["round"], "sample_id": sid, "how": how}
                                        for how, ids in (queried or {}).items() for sid in ids],
                        ["round", "sample_id", "how"])

    def log_pool_scores(self, rnd, ids, scores, picked):
        """pool_scores.csv, every round: one row per pool sample scored this round (round, sample_id, each score
        the rule uses, picked: the group it went to, or empty), so any pick can be checked against its rule
        from the run folder alone. ids: sample ids; scores: {column: values aligned with ids}; picked: a
        sequence aligned with ids ("" = stayed in the pool) or {group: ids in that group}."""
        ids = list(ids)
        if isinstance(picked, dict):
            where = {sid: how for how, group in picked.items() for sid in group}
            picked = [where.get(sid, "") for sid in ids]
        cols = ["round", "sample_id"] + list(scores) + ["picked"]
        self.append_csv("pool_scores.csv", [dict({"round": rnd, "sample_id": sid, "picked": picked[k] or ""},
                                                 **{c: _plain(v[k]) for c, v in scores.items()})
                                            for k, sid in enumerate(ids)], cols)

    def elapsed(self):
        return self.offset_s + time.time() - self.t0

    def save_checkpoint(self, state):
        """Everything --resume needs, written atomically: model, optimiser, RNG states, the sets."""
        state = dict(state, script=self.script, rng_python=random.getstate(), rng_numpy=np.random.get_state(),
                     rng_torch=torch.get_rng_state(), elapsed_s=self.elapsed(),
                     rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        tmp = self.path("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path("checkpoint.pt"))
        stop = os.environ.get("ALSEG_STOP_AFTER_ROUND")  # tests: simulate a run killed after this round
        if stop is not None and int(stop) == state["round"]:
            print(f"stopping after round {stop} (ALSEG_STOP_AFTER_ROUND); continue with --resume "
                  f"{shlex.quote(self.dir)}")
            self.release_lock()
            sys.exit(3)

    def load_checkpoint(self, reads=()):
        """checkpoint.pt of the last finished round, checked (a dict this script wrote, holding the keys read here
        and those in reads), the RNG states restored and the unfinished round's CSV rows dropped; None for a new
        run or a --resume before any round finished."""
        path = self.path("checkpoint.pt")
        if not (self.args.resume and os.path.isfile(path)):
            if self.args.resume:
                later = [r for r in self.read_csv("rounds.csv")
                         if None not in r.values() and r.get("round") not in (None, "0")]
                if later or os.path.isfile(self.path("summary.json")):  # a kill before it leaves a round 0 row only
                    raise UserError(f"{path}: not found, but {self.dir} finished "
                                    + (f"{len(later) + 1} rounds (rounds.csv)" if later else "(summary.json)")
                                    + "; --resume goes on from checkpoint.pt: restore it, or start a new run")
                asked = os.path.isdir(self.path(os.path.join("to_label", "round_0")))  # --oracle folder's first stop
                print(f"resume: {self.dir} " + ("round 0 runs, with the labels to_label/round_0 asked for" if asked
                      else "has no finished round yet (no checkpoint.pt): round 0 starts again"))
                for name in sorted(os.listdir(self.dir)):  # rows of the unfinished round 0 (e.g. an oracle stop)
                    if name.endswith(".csv") and "round" in (self.read_csv(name)[:1] or [{}])[0]:
                        self.truncate_csv(name, None)
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                            f"a copy cut short? Restore it, or start a new run")
        need = {"round", "rng_python", "rng_numpy", "rng_torch", *reads}
        why = (f"a {type(state).__name__}, not the dict a round's end saves" if not isinstance(state, dict) else
               f"no {', '.join(sorted(need - set(state)))} in it" if not need <= set(state) else
               f"it is {state['script']}'s" if state.get("script", self.script) != self.script else None)
        if why:  # e.g. a bare state_dict saved over it, another script's checkpoint copied in
            raise UserError(f"{path}: not a checkpoint {self.script} wrote ({why}); restore the run's own, or start a "
                            f"new run")
        random.setstate(state["rng_python"])
        np.random.set_state(state["rng_numpy"])
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.offset_s = state.get("elapsed_s", 0.0)
        done = state["round"]
        for name in sorted(os.listdir(self.dir)):  # every per-round CSV loses the rows of the unfinished round,
            if name.endswith(".csv") and "round" in (self.read_csv(name)[:1] or [{}])[0]:  # and a row cut short
                self.truncate_csv(name, done)
        rows = self.read_csv("rounds.csv")
        if str(done) not in [r["round"] for r in rows]:  # its row is written before it
            raise UserError(f"{self.path('rounds.csv')}: no row of round {done}, which checkpoint.pt finished; restore "
                            f"the file, or start a new run")
        for line, r in enumerate(rows, 2):  # the progress line, the curve and the tables read these as numbers
            bad = next((c for c in ROUND_COLUMNS if not _number(r.get(c))), None)
            if bad:
                raise UserError(f"{self.path('rounds.csv')}: line {line}: {bad} " + (f"= {r[bad]!r}, not a number"
                                if bad in r else "column missing") + "; expected the rows the run wrote (a hand "
                                "edit, a copy cut short?): restore the file")
        if len(self.read_csv("queried.csv")) < state.get("queried_rows", 0):  # the record of who labelled what
            raise UserError(f"{self.path('queried.csv')}: {len(self.read_csv('queried.csv'))} rows, but the rounds "
                            f"checkpoint.pt finished wrote {state['queried_rows']}; restore the file, or start a new run")
        print(f"resume: {self.dir} after round {done}")
        return state


def _finite(o):
    """JSON without NaN or Infinity (not JSON; jq and JavaScript refuse them): null, e.g. no test set's Dice."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    return {k: _finite(v) for k, v in o.items()} if isinstance(o, dict) else \
        [_finite(v) for v in o] if isinstance(o, (list, tuple)) else o


def _number(v):
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _plain(v):
    """A numpy / torch scalar as a plain Python number (for the CSV writer)."""
    return v.item() if hasattr(v, "item") else v
