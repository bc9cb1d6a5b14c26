"""What a user meets when a run stops or is started wrong (the new-user audit of 2026-11-26): a rejected run
leaves no empty folder, Ctrl-C and SIGTERM name the folder to resume, flags that would crash later are refused
at the start, a damaged run folder or changed data is one clear line, --resume works from any folder, CEAL says
which iterations got fewer labels, and SSL refuses too many clusters before pre-training."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import ceal_mcdropout
import common
import dsal_fingerbones
import example_claspe
import runfolder
import example_tta
import oracle
import polyp_weighted_cluster
import region_uncertainty
import ssl_coldstart
from conftest import ROOT, THREADS
from test_data_checks import folder, one_line_error

TINY = ["--data", "folder", "--image-size", "32", "--width", "4", "--rounds", "2", "--epochs-initial", "1",
        "--epochs", "1", "--split", "6", "3", "3", "--initial", "2", "--query", "2", "--device", "cpu"]


def _args(**kw):
    return types.SimpleNamespace(**dict(dict(resume=None, data="synthetic", strategy="x", seed=0, out="runs",
                                             data_dir=None), **kw))


def test_a_rejected_new_run_leaves_no_folder_but_a_started_one_is_kept(tmp_path, capsys):
    def rejected():
        run = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu"))
        run.write_json("splits.json", {})
        raise common.UserError("bad data")
    assert one_line_error(capsys, rejected) == "error: bad data" and os.listdir(tmp_path) == []

    def after_a_round():
        run = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu"))
        run.append_csv("rounds.csv", {"round": 0})
        raise common.UserError("bad labels")
    one_line_error(capsys, after_a_round)
    assert len(os.listdir(tmp_path)) == 1  # a finished round is never thrown away

    def resumed():  # a resumed run's folder is never removed, whatever it holds
        common.Run("x.py", _args(resume=os.path.join(tmp_path, os.listdir(tmp_path)[0])), torch.device("cpu"))
        raise common.UserError("bad labels")
    one_line_error(capsys, resumed)
    assert len(os.listdir(tmp_path)) == 1


def test_out_of_memory_is_one_line_and_leaves_no_empty_folder(tmp_path, capsys):
    """--image-size 1000000 asked numpy for 14.6 TiB: a MemoryError traceback, and the new run folder stayed
    (the fuzz of 2026-11-27); a GPU's OutOfMemoryError the same."""
    for error in (MemoryError("Unable to allocate 14.6 TiB for an array"), torch.OutOfMemoryError("CUDA out of memory"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 360000000000 bytes.")):  # torch's CPU allocator (--width 100000)
        def big():
            common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu")).write_json("splits.json", {})
            raise error
        with pytest.raises(SystemExit) as e:
            common.run_main(big)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err == (f"error: out of memory ({type(error).__name__}: {error}); start a new run "
                                             "with a lower --batch-size or --image-size (--resume keeps the run's)\n")
        assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError is a bug: its traceback, as it was
        common.run_main(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_a_full_disk_or_a_read_only_file_in_the_run_folder_is_one_line(tmp_path, capsys):
    """A write into the run folder that fails (a full disk or quota; rounds.csv made read-only) was a traceback;
    now one line naming the file, whether rounds are saved and the --resume command, exit status 1. An OSError
    elsewhere (a data file) is not this, and stays what it was."""
    run_dir = []

    def writes(error):
        def main():
            run = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu"))
            run_dir.append(run.dir)
            run.append_csv("rounds.csv", {"round": 0})
            open(run.path("checkpoint.pt"), "w").close()
            raise error(run)
        return main
    for error, said in ((lambda run: OSError(errno.ENOSPC, "No space left on device"), "in {d} (No space left on device)"),
                        (lambda run: PermissionError(13, "Permission denied", run.path("rounds.csv")),
                         "{d}/rounds.csv (Permission denied)")):
        with pytest.raises(SystemExit) as e:
            common.run_main(writes(error))
        d = run_dir[-1]
        assert e.value.code == 1 and capsys.readouterr().err == (f"error: cannot write {said.format(d=d)}; finished "
                                                                 f"rounds are saved: make room or allow writing, then "
                                                                 f"--resume {d}\n")
    with pytest.raises(FileNotFoundError):
        common.run_main(writes(lambda run: FileNotFoundError(2, "No such file", "/elsewhere/data.png")))


def test_ctrl_c_names_the_run_folder(tmp_path, capsys):
    """The line says whether a round is saved (checkpoint.pt, what --resume reads): before the first one
    finished, it does not claim finished rounds, and says round 0 starts again, as --resume then does, and which
    state saved before round 0 is kept (ssl_coldstart.py's pre-training, saved each epoch). A folder with a space
    is quoted, so that the command pastes whole."""
    def interrupted(finished):
        run = common.Run("x.py", _args(out=str(tmp_path / f"my runs {finished}")), torch.device("cpu"))
        if finished:
            run.save_checkpoint({"round": 0})
        if finished is None:
            open(run.path("ssl_pretrain.pt"), "w").close()
        raise KeyboardInterrupt
    for finished, said in ((True, "finished rounds are saved"), (False, "no round finished yet: round 0 starts again"),
                           (None, "no round finished yet: round 0 starts again (ssl_pretrain.pt kept: --resume goes "
                                  "on from it)")):
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: interrupted(finished))
        run_dir = os.path.join(tmp_path, f"my runs {finished}", os.listdir(tmp_path / f"my runs {finished}")[0])
        assert e.value.code == 130 and capsys.readouterr().err == (
            f"interrupted: {said}; continue with --resume '{run_dir}'\n")


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """A cluster's time limit sends SIGTERM: the same message and exit status 130, the folder kept."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "example_tta.py"), "--device", "cpu", "--image-size",
                          "32", "--width", "4", "--epochs-initial", "200", "--out", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    first = p.stdout.readline()  # before the first epoch, which may take minutes: the run folder and the plan
    for line in p.stdout:  # the first epoch line: the run folder exists and training is under way
        if "epoch" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    run_dir = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert p.returncode == 130 and err.strip().endswith(f"continue with --resume {run_dir}"), err
    assert first == f"run: {run_dir} on cpu: pool 300, validation 60, test 100; 30 labelled, then 4 rounds of +15\n"


def test_a_run_a_live_process_writes_is_not_resumed_beside_it(tmp_path, capsys):
    """run.lock: a --resume of a run that a live process is still writing (a requeued cluster job beside the old
    one, a second terminal) stops with one line naming the holder, instead of two processes mixing their rounds
    in one rounds.csv. The lock is the OS's: once the holder is gone, even by SIGKILL (no chance to clean up), the
    resume goes on; a later Run of the same process takes its own lock over."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "example_tta.py"), "--device", "cpu", "--image-size",
                          "32", "--width", "4", "--epochs-initial", "200", "--out", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        p.stdout.readline()  # "run: RUN_DIR on cpu ...": the folder is made and locked
        run_dir = os.path.join(tmp_path, os.listdir(tmp_path)[0])
        err = one_line_error(capsys, lambda: common.Run("example_tta.py", _args(resume=run_dir), torch.device("cpu")))
        assert err.startswith(f"error: --resume {run_dir}: pid {p.pid} on ") and "is writing this run now" in err, err
    finally:
        p.kill()
        p.wait()
    assert not os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))  # the holder was stopped mid-round 0
    common.Run("example_tta.py", _args(resume=run_dir), torch.device("cpu"))  # SIGKILL left no stale lock
    common.Run("example_tta.py", _args(resume=run_dir), torch.device("cpu"))  # this process's own lock, taken over
    assert open(os.path.join(run_dir, "run.lock")).read().startswith(f"pid {os.getpid()} on ")


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """A run folder on a read-only mount (checked with open failing: this machine's tests run as root)."""
    run_dir = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu")).dir
    real_open = open

    def read_only(path, mode="r", *a, **kw):
        if mode != "r":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(runfolder, "open", read_only, raising=False)
    err = one_line_error(capsys, lambda: common.Run("x.py", _args(resume=run_dir), torch.device("cpu")))
    assert err == f"error: {run_dir}/run.lock: cannot write in the run folder (Permission denied)"


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """A job array starts the same flags at once: the second folder is -2, the third -3 (makedirs decides, so a
    folder made by another process between a check and the making is not shared)."""
    now = runfolder.datetime.datetime(2026, 11, 27, 16, 30, 0)
    monkeypatch.setattr(runfolder, "datetime", types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: now)))
    dirs = [common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu")).dir for _ in range(3)]
    name = os.path.join(tmp_path, "x__synthetic__x__s0__20261127-163000")
    assert dirs == [name, name + "-2", name + "-3"]
    makedirs = os.makedirs
    makedirs(tmp_path / "b")

    def other_process_first(path, *a, **k):  # another process makes the first folder between a check and this call
        if not os.listdir(tmp_path / "b"):
            os.mkdir(path)
        return makedirs(path, *a, **k)
    monkeypatch.setattr(runfolder.os, "makedirs", other_process_first)
    assert common.Run("x.py", _args(out=str(tmp_path / "b")), torch.device("cpu")).dir.endswith("163000-2")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr nan: expected a finite learning rate above 0"),
    (["--lr", "inf"], "--lr inf: expected a finite learning rate above 0"),
    (["--seed", str(2 ** 32)], f"--seed {2 ** 32}: expected below 2^32"),
    (["--data-dir", "mine"], "--data-dir mine with --data synthetic, which is built in and reads no folder"),
])
def test_flags_that_would_fail_later_are_refused_at_the_start(flags, message):
    with pytest.raises(common.UserError, match=message.replace("^", r"\^")):
        example_tta.parse_args(flags)
    example_tta.parse_args(["--resume", "RUN", "--data-dir", "mine"])  # a resume's --data-dir: the data moved


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_device_this_machine_lacks_is_a_clear_error():
    with pytest.raises(common.UserError, match="--device mps: MPS is not available on this machine"):
        common.get_device("mps")
    for name in ("xpu", "hip", "meta"):  # types torch names but this code never runs on: were tracebacks later
        with pytest.raises(common.UserError, match=f"--device {name}: expected auto, cuda \\(or cuda:N\\), mps or cpu"):
            common.get_device(name)
    n = torch.cuda.device_count()
    if n:  # an index past the machine's GPUs: was "invalid device ordinal" at the first tensor
        with pytest.raises(common.UserError, match=f"--device cuda:{n}: this machine has {n} CUDA device"):
            common.get_device(f"cuda:{n}")


def test_resume_of_a_folder_that_is_not_there(tmp_path):
    with pytest.raises(common.UserError, match="no such folder; expected a run folder"):
        common.Run("x.py", _args(resume=str(tmp_path / "nowhere")), torch.device("cpu"))
    with pytest.raises(common.UserError, match="no config.json there; expected a run folder"):
        common.Run("x.py", _args(resume=str(tmp_path)), torch.device("cpu"))
    (tmp_path / "file").write_text("")
    with pytest.raises(common.UserError, match="file: a file; expected a run folder"):
        common.Run("x.py", _args(resume=str(tmp_path / "file")), torch.device("cpu"))


def test_resume_from_another_folder_and_with_the_data_moved(tmp_path, monkeypatch, capsys):
    """--data-dir is recorded as an absolute path, so --resume works from any folder; a resume may name where
    the data went (--data-dir), and the split is checked against the run's."""
    folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALSEG_STOP_AFTER_ROUND", "1")
    with pytest.raises(SystemExit):
        example_tta.main(TINY + ["--data-dir", "d", "--out", "runs"])
    run_dir = str(tmp_path / "runs" / os.listdir(tmp_path / "runs")[0])
    assert json.load(open(os.path.join(run_dir, "config.json")))["args"]["data_dir"] == str(tmp_path / "d")
    monkeypatch.delenv("ALSEG_STOP_AFTER_ROUND")
    os.rename(tmp_path / "d", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(common.UserError, match=f"--data-dir {tmp_path / 'd'}: folder not found"):
        example_tta.main(["--resume", run_dir])
    example_tta.main(["--resume", run_dir, "--data-dir", "../moved"])
    assert "ignored" not in capsys.readouterr().out
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["args"]["data_dir"] == str(tmp_path / "moved") and os.path.isfile(os.path.join(run_dir, "summary.json"))


def test_a_damaged_run_folder_or_changed_data_is_one_clear_line(tmp_path, monkeypatch):
    root = folder(tmp_path / "d")
    monkeypatch.setenv("ALSEG_STOP_AFTER_ROUND", "1")
    with pytest.raises(SystemExit):
        example_tta.main(TINY + ["--data-dir", root, "--out", str(tmp_path / "runs")])
    monkeypatch.delenv("ALSEG_STOP_AFTER_ROUND")
    run_dir = str(tmp_path / "runs" / os.listdir(tmp_path / "runs")[0])
    path = lambda name: os.path.join(run_dir, name)
    splits = open(path("splits.json")).read()
    with open(path("splits.json"), "w") as f:
        f.write(splits[:40])  # cut short
    with pytest.raises(common.UserError, match=f"{path('splits.json')}: unreadable"):
        example_tta.main(["--resume", run_dir])
    for shape in ("[]", '{"train": 5}', '{"train": [1, 2]}'):  # JSON, but not a split: was an AttributeError
        with open(path("splits.json"), "w") as f:
            f.write(shape)
        with pytest.raises(common.UserError, match=f"{path('splits.json')}: not a split; expected the run's split"):
            example_tta.main(["--resume", run_dir])
    edited = json.loads(splits)
    edited["test"][0] = edited["train"][0]  # a hand edit: one sample in two sets
    with open(path("splits.json"), "w") as f:
        json.dump(edited, f)
    with pytest.raises(common.UserError, match=r"splits.json: the split made from .* now differs from the run's \(0 of "
                                               r"its samples gone .*\): the data changed since the run started, or "
                                               r"this file was edited; put it back"):
        example_tta.main(["--resume", run_dir])
    with open(path("splits.json"), "w") as f:
        f.write(splits)
    # a training sample gone (its image and mask): the data changed, not "lower --split"
    gone = json.loads(splits)["train"][0]
    for sub in ("images", "masks"):
        name = next(n for n in os.listdir(os.path.join(root, sub)) if n.startswith(gone))
        os.rename(os.path.join(root, sub, name), tmp_path / f"{sub}-{name}")
    with pytest.raises(common.UserError, match=r"now differs from the run's \(1 of its samples gone from the data, "
                                               r"11 samples there now\): the data changed"):
        example_tta.main(["--resume", run_dir])
    for sub in ("images", "masks"):
        name = next(n for n in os.listdir(tmp_path) if n.startswith(f"{sub}-"))
        os.rename(tmp_path / name, os.path.join(root, sub, name[len(sub) + 1:]))
    # other pixels under the same names (another dataset in the same layout, an edited image): not the run's data
    image = os.path.join(root, "images", sorted(os.listdir(os.path.join(root, "images")))[0])
    original = open(image, "rb").read()
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    with pytest.raises(common.UserError, match=r"the images differ from the run's \(the same sample names, other "
                                               r"pixels: crc32 [0-9a-f]{8}, the run's [0-9a-f]{8} in its config.json\): "
                                               r"the data changed since the run started; put it back"):
        example_tta.main(["--resume", run_dir])
    config = open(path("config.json")).read()
    with open(path("config.json"), "w") as f:  # the run started under another Pillow: named as a possible cause
        json.dump(dict(json.loads(config), pillow="9.0.0"), f)
    with pytest.raises(common.UserError, match=r"the data changed since the run started; or Pillow \S+ decodes or "
                                               r"resizes them otherwise than the run's 9.0.0 did; put it back"):
        example_tta.main(["--resume", run_dir])
    with open(path("config.json"), "w") as f:
        f.write(config)
    with open(image, "wb") as f:
        f.write(original)
    queried = open(path("queried.csv")).read()
    for cut in ("", queried[:queried.rindex("\n", 0, -1) + 1]):  # deleted, or its last row gone: whose labels?
        with open(path("queried.csv"), "w") as f:
            f.write(cut)
        rows = lambda text: max(0, text.count("\n") - 1)  # less the header
        with pytest.raises(common.UserError, match=f"{path('queried.csv')}: {rows(cut)} rows, but the rounds "
                                                   f"checkpoint.pt finished wrote {rows(queried)}"):
            example_tta.main(["--resume", run_dir])
    line = queried[:queried.index("\n1,")].count("\n") + 2  # the first row of round 1, written as 1.5 by hand
    with open(path("queried.csv"), "w") as f:
        f.write(queried.replace("\n1,", "\n1.5,", 1))
    with pytest.raises(common.UserError, match=f"{path('queried.csv')}: line {line}: round = '1.5', not a whole "
                                               f"number; expected the rows the run wrote"):
        example_tta.main(["--resume", run_dir])  # was: a ValueError traceback from int()
    with open(path("queried.csv"), "w") as f:
        f.write(queried)
    rounds = open(path("rounds.csv")).read()
    os.remove(path("rounds.csv"))
    with pytest.raises(common.UserError, match=f"{path('rounds.csv')}: no row of round 1, which checkpoint.pt "
                                               f"finished"):
        example_tta.main(["--resume", run_dir])
    for damaged, why in ((rounds[:rounds.rstrip().rindex(",") + 1] + "\n", "line 3: select_s = '', not a number"),
                         (rounds.replace("dice_mean", "dice", 1), "line 2: dice_mean column missing")):
        with open(path("rounds.csv"), "w") as f:  # the last finished round's row cut short; the header edited
            f.write(damaged)
        with pytest.raises(common.UserError, match=f"{path('rounds.csv')}: {why}; expected the rows the run wrote"):
            example_tta.main(["--resume", run_dir])  # was: a ValueError or KeyError in the progress line
    with open(path("rounds.csv"), "w") as f:
        f.write(rounds)
    os.remove(path("checkpoint.pt"))  # was: round 0 started again, and rounds.csv lost its two finished rounds
    with pytest.raises(common.UserError, match=f"{path('checkpoint.pt')}: not found, but {run_dir} finished 2 rounds "
                                               r"\(rounds.csv\); --resume goes on from checkpoint.pt: restore it"):
        example_tta.main(["--resume", run_dir])
    assert open(path("rounds.csv")).read() == rounds
    with pytest.raises(common.UserError, match=r"--resume '': expected a run folder \(an empty shell variable\?\)"):
        example_tta.main(["--resume", ""])  # was: a new run of the default flags


def test_a_checkpoint_or_config_that_does_not_fit_the_run_is_one_clear_line(tmp_path, monkeypatch):
    """checkpoint.pt replaced by a bare state_dict or another script's, config.json's width or threads edited:
    were a KeyError, a 112-line size-mismatch RuntimeError, a TypeError (the audit of 2026-11-27)."""
    monkeypatch.setenv("ALSEG_STOP_AFTER_ROUND", "0")
    with pytest.raises(SystemExit):
        example_tta.main(TINY + ["--data-dir", folder(tmp_path / "d"), "--out", str(tmp_path / "runs")])
    monkeypatch.delenv("ALSEG_STOP_AFTER_ROUND")
    run_dir = str(tmp_path / "runs" / os.listdir(tmp_path / "runs")[0])
    path = lambda name: os.path.join(run_dir, name)
    state, config = torch.load(path("checkpoint.pt"), weights_only=False), open(path("config.json")).read()
    assert state["script"] == "example_tta"
    for other, says in ((state["model"], "no model, opt, rng_batches, .*, round in it"),
                        ([1, 2], "a list, not the dict a round's end saves"),
                        (dict(state, script="ceal_mcdropout"), r"\(it is ceal_mcdropout's\)")):
        torch.save(other, path("checkpoint.pt"))
        with pytest.raises(common.UserError, match=f"{path('checkpoint.pt')}: not a checkpoint example_tta wrote .*"
                                                   f"{says}"):
            example_tta.main(["--resume", run_dir])
    torch.save(state, path("checkpoint.pt"))
    for key, value, says in (("width", 8, f"{path('checkpoint.pt')}: does not fit the model its config.json builds "
                                          r"\(size mismatch for .*config.json edited, or checkpoint.pt from another run"),
                             ("threads", "4", f"{path('config.json')}: \"threads\": '4', expected a whole number"),
                             ("threads", 0, f"{path('config.json')}: \"threads\": 0, expected a whole number")):
        cfg = json.loads(config)
        (cfg["args"] if key == "width" else cfg)[key] = value
        with open(path("config.json"), "w") as f:
            json.dump(cfg, f)
        with pytest.raises(common.UserError, match=says):
            example_tta.main(["--resume", run_dir])
    with open(path("config.json"), "w") as f:
        f.write(config)
    example_tta.main(["--resume", run_dir])  # put back, the run goes on
    assert os.path.isfile(path("summary.json"))


def test_a_resumed_runs_own_flags_pass_the_checks_a_new_runs_do(tmp_path, monkeypatch, capsys):
    """--resume takes the run's flags from its config.json, after parse_args checked the ones typed: a hand-edited
    or damaged value there used to reach torch or numpy (a traceback later). Now it goes through the same
    argparse types and resolve checks, one line naming the file; a flag the file lacks (added by a newer
    version) gets its default, with a note."""
    monkeypatch.setenv("ALSEG_STOP_AFTER_ROUND", "1")
    with pytest.raises(SystemExit):
        example_tta.main(TINY + ["--data-dir", folder(tmp_path / "d"), "--out", str(tmp_path / "runs")])
    monkeypatch.delenv("ALSEG_STOP_AFTER_ROUND")
    run_dir = str(tmp_path / "runs" / os.listdir(tmp_path / "runs")[0])
    path, cfg = os.path.join(run_dir, "config.json"), json.load(open(os.path.join(run_dir, "config.json")))
    for key, value, says in (("lr", -1, "--lr -1.0: expected a finite learning rate above 0"),
                             ("lr", "abc", "argument --lr: invalid float value: 'abc'"),
                             ("batch_size", 0, "--batch-size 0: expected at least 1"),
                             ("image_size", 30, "--image-size 30: expected a multiple of 16, at least 32"),
                             ("split", [6, 3], "argument --split: expected 3 arguments"),
                             ("strategy", "best", "argument --strategy: invalid choice: 'best'"),
                             ("amp", "yes", "argument --amp: expected true or false, not 'yes'")):
        with open(path, "w") as f:
            json.dump(dict(cfg, args=dict(cfg["args"], **{key: value})), f)
        err = one_line_error(capsys, lambda: example_tta.main(["--resume", run_dir]))
        assert err.startswith(f"error: {path}: {says}") and "a hand edit?" in err, err
    with open(path, "w") as f:  # --compile is newer than this run: its default, said
        json.dump(dict(cfg, args={k: v for k, v in cfg["args"].items() if k != "compile"}), f)
    example_tta.main(["--resume", run_dir])
    assert f"note: {path} has no compile (a run of an older version?): compile False" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))


@pytest.mark.parametrize("script, key, value, says", [  # each script's own checks, after resolve's
    (ceal_mcdropout, "dropout", 0.0, "--strategy ceal needs --dropout > 0"),
    (ssl_coldstart, "ssl_lr", 0.0, "--ssl-lr 0.0: expected a learning rate above 0"),
    (region_uncertainty, "image_size", 32, "--image-size 32: expected a multiple of 32, at least 64"),
    (polyp_weighted_cluster, "kmeans_init", 0, "--kmeans-init 0: expected at least 1"),
    (dsal_fingerbones, "ds_stages", [1, 1], "--ds-stages 1 1: expected two different decoder stages"),
    (example_tta, "batch_size", 0, "--batch-size 0: expected at least 1"),
    (example_claspe, "fg_share", 2.0, "need --beta-start > 0, --beta-end > 0 and 0 <= --fg-share <= 1")])
def test_every_script_checks_a_resumed_runs_flags_with_its_own_parse_args(script, key, value, says, tmp_path,
                                                                          monkeypatch):
    def unchecked(*a):  # the next step of Run.start: reached, the run would go on with the bad value
        raise AssertionError(f"{key} {value!r} not refused")
    monkeypatch.setattr(runfolder, "seed_everything", unchecked)
    args = {k: v for k, v in vars(script.parse_args(["--device", "cpu"])).items() if not k.startswith("_")}
    name = script.__name__
    with open(tmp_path / "config.json", "w") as f:  # the run stops before its data is read
        json.dump({"script": name, "args": dict(args, **{key: value})}, f)
    with pytest.raises(common.UserError, match=f"{tmp_path / 'config.json'}: {says}".replace("(", r"\(")):
        script.main(["--resume", str(tmp_path)])


def test_ceal_says_which_iterations_got_fewer_labels(tmp_path, capsys):
    """14 training samples, 4 + 2 x 4 queries + 1 new pseudo-label per iteration: the pool runs out in
    iteration 4, which gets 1 of its 2 queries and none of its pseudo-labels, and says so."""
    ceal_mcdropout.main(["--device", "cpu", "--image-size", "32", "--width", "4", "--rounds", "4",
                         "--epochs-initial", "1", "--epochs", "1", "--split", "14", "3", "3", "--initial", "4",
                         "--query", "2", "--pseudo-step", "1", "--mc-passes", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "exceed the training pool of 14 by 2: the last iterations get fewer (each says how many)" in out
    short = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert short == ["iteration 4: 1 of 2 queries to the oracle, 0 of 1 new pseudo-labels (pool 1)"]
    run_dir = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    rows = common.read_rows(os.path.join(run_dir, "rounds.csv"))
    assert [(r["labeled"], r["pseudo"]) for r in rows] == [("4", "0"), ("6", "1"), ("8", "2"), ("10", "3"),
                                                          ("11", "3")]


def test_ssl_refuses_too_many_clusters_before_pre_training(tmp_path):
    t0 = time.time()
    with pytest.raises(common.UserError, match="--clusters 100: more clusters than the 40 pool samples"):
        ssl_coldstart.main(["--device", "cpu", "--split", "40", "10", "10", "--initial", "10", "--rounds", "2",
                            "--clusters", "100", "--image-size", "32", "--width", "4", "--out", str(tmp_path)])
    run_dir = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert not os.path.exists(os.path.join(run_dir, "ssl_weights.pt")) and time.time() - t0 < 30


def test_encoder_weights_that_are_no_state_dict_say_what_was_expected(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file\n" * 50)  # fixed bytes: random ones fail in other ways (IndexError, ...)
    args = types.SimpleNamespace(width=64, dropout=0.0, encoder_weights=str(bad), compile=False)
    with pytest.raises(common.UserError) as e:
        region_uncertainty.build_model(args, torch.device("cpu"))
    assert str(e.value) == (f"--encoder-weights {bad}: torch.load refused it (UnpicklingError: not a file of tensors "
                            f"only); expected torchvision's ResNet-18 state dict (resnet18-f37072fd.pth)")
    torch.save({"round": 0, "rng": np.random.get_state()}, bad)  # a run's checkpoint.pt: more than tensors
    with pytest.raises(common.UserError, match=r"torch.load refused it \(\w+: not a file of tensors only\)"):
        region_uncertainty.build_model(args, torch.device("cpu"))


def test_labels_drawn_inverted_get_the_loaders_warning(tmp_path, capsys):
    data = types.SimpleNamespace(ids=["a", "b"], files=None, x=np.zeros((2, 3, 32, 32), np.uint8))
    m = np.full((32, 32), 255, np.uint8)
    m[10:20, 10:20] = 0  # the object black on white
    for sid in data.ids:
        Image.fromarray(m).save(tmp_path / f"{sid}.png")
    labels = oracle.read_labels(str(tmp_path), data.ids, data, 32)
    assert labels.shape == (2, 32, 32) and capsys.readouterr().out == (
        f"warning: 2 label(s) in {tmp_path} are foreground on more than 50% of their border pixels (a.png, b.png); "
        f"expected the object white (255 or 1) on a black background: are they inverted?\n")
    Image.fromarray(255 - m).save(tmp_path / "a.png")
    Image.fromarray(255 - m).save(tmp_path / "b.png")
    oracle.read_labels(str(tmp_path), data.ids, data, 32)
    assert "warning" not in capsys.readouterr().out
    # one inverted file among right ones (the annotator's slip): named, though the round's mean share is low
    more = types.SimpleNamespace(ids=["a", "b", "c", "d"], files=None, x=np.zeros((4, 3, 32, 32), np.uint8))
    for sid in "cd":
        Image.fromarray(255 - m).save(tmp_path / f"{sid}.png")
    Image.fromarray(m).save(tmp_path / "c.png")
    oracle.read_labels(str(tmp_path), more.ids, more, 32)
    assert f"warning: 1 label(s) in {tmp_path} are foreground on more than 50% of their border pixels (c.png)" \
        in capsys.readouterr().out
    os.remove(tmp_path / "c.png"), os.remove(tmp_path / "d.png")
    Image.fromarray(255 - m).save(tmp_path / "a.png")
    Image.fromarray(np.zeros_like(m)).save(tmp_path / "a.png")  # one empty label: may be right (no object)
    oracle.read_labels(str(tmp_path), data.ids, data, 32)
    assert "warning" not in capsys.readouterr().out
    Image.fromarray(np.zeros_like(m)).save(tmp_path / "b.png")  # all of a round's: was accepted without a word
    oracle.read_labels(str(tmp_path), data.ids, data, 32)
    assert capsys.readouterr().out == f"warning: all 2 labels in {tmp_path} are empty (black): the model learns " \
        "background only from them; expected the object white on black (saved from the right layer?)\n"


def test_a_label_named_like_the_masks_folder_gets_a_rename_hint(tmp_path):
    data = types.SimpleNamespace(ids=["a"], files=None, x=np.zeros((1, 3, 32, 32), np.uint8))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a_mask.png")
    with pytest.raises(common.UserError) as e:
        oracle.read_labels(str(tmp_path), data.ids, data, 32)
    assert "  missing: a.png (found a_mask.png: rename it a.png)" in str(e.value).splitlines()


@pytest.mark.parametrize("name, hint", [
    ("a.png ", "found 'a.png ': rename it a.png"),  # a space at either end, quoted so that it shows
    (" a.png", "found ' a.png': rename it a.png"),
    ("a.png.png", "found a.png.png: rename it a.png"),  # Windows hid the first extension
    ("a.jpg.png", "found a.jpg.png: rename it a.png"),
    ("A.png", "found A.png: rename it a.png"),
    ("a.png.jpg", "found a.png.jpg: save it as PNG"),
    ("a .jpg", "found a .jpg: save it as PNG")])
def test_a_label_named_almost_as_asked_gets_a_rename_hint_and_no_extra_line(tmp_path, name, hint):
    """The walk-through of 2026-11-28: a trailing space was told "save it as PNG", a leading one and a.png.png
    got a missing line and an extra line with nothing linking them."""
    data = types.SimpleNamespace(ids=["a"], files=None, x=np.zeros((1, 3, 32, 32), np.uint8))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / name, format="PNG")
    with pytest.raises(common.UserError) as e:
        oracle.read_labels(str(tmp_path), data.ids, data, 32)
    assert str(e.value).splitlines()[1:] == [f"  missing: a.png ({hint})"]


def test_images_without_masks_say_that_split_and_validation_come_from_the_folder(tmp_path, capsys):
    root = folder(tmp_path / "d")
    for name in sorted(os.listdir(os.path.join(root, "masks")))[:8]:  # 8 images to label, 4 with masks
        os.remove(os.path.join(root, "masks", name))
    with pytest.raises(SystemExit):  # round 0 asks the person and stops
        example_tta.main(TINY + ["--data-dir", root, "--oracle", "folder", "--out", str(tmp_path / "runs")])
    assert ("data: 8 images to label (the pool), 4 with masks (the test set); no validation set (val_dice nan); "
            "--split set from the folder, not [6, 3, 3]") in capsys.readouterr().out
    run = os.path.join(tmp_path, "runs", os.listdir(tmp_path / "runs")[0])
    with pytest.raises(common.UserError, match="folder not found"):  # --resume, no labels yet: the run's split is
        example_tta.main(["--resume", run, "--data-dir", root])  # the folder's: no note that contradicts itself
    assert "(val_dice nan)\n" in capsys.readouterr().out


def test_an_image_size_below_the_smallest_names_the_smallest():
    with pytest.raises(common.UserError, match=r"--image-size 32: expected a multiple of 32, at least 64 \(the U-Net's "
                                               r"poolings\); the nearest is 64$"):
        region_uncertainty.parse_args(["--image-size", "32"])
