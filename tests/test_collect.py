"""collect.py and common.collect_runs / summarise / markdown_table on hand-made run folders; the run folder's
CSV line ends and --resume's flags (common.Run)."""
import argparse
import csv
import json
import math
import os
import random

import numpy as np
import pytest
from PIL import Image
import torch

import collect
import common
import runfolder
import example_tta

COLS = common.ROUND_COLUMNS


def fake_run(root, name, script, strategy, seed, dices, data="synthetic", labeled=(10, 20, 30), finished=True):
    d = root / name
    d.mkdir(parents=True)
    json.dump({"script": script, "args": {"data": data, "strategy": strategy, "seed": seed}}, open(d / "config.json", "w"))
    with open(d / "rounds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        for r, (n, dice) in enumerate(zip(labeled, dices)):
            w.writerow(dict(round=r, labeled=n, pseudo=0, dice_mean=dice, dice_std=0.1, iou_mean=dice - 0.1,
                            train_s=1, select_s=1))
    if finished:
        json.dump({"final_dice": dices[-1]}, open(d / "summary.json", "w"))
    return d


def test_grouping_mean_std_and_missing_rounds(tmp_path):
    fake_run(tmp_path, "a0", "ceal_mcdropout", "ceal", 0, [0.5, 0.6, 0.7])
    fake_run(tmp_path, "a1", "ceal_mcdropout", "ceal", 1, [0.7, 0.8], finished=False)  # interrupted: no round 2
    fake_run(tmp_path, "b0", "ceal_mcdropout", "random", 0, [0.4, 0.5, 0.6])
    fake_run(tmp_path, "c0", "ssl_coldstart", "random", 0, [0.3, 0.35, 0.4])
    fake_run(tmp_path, "d0", "ceal_mcdropout", "ceal", 0, [0.9, 0.9, 0.9], data="lgg")
    (tmp_path / "not_a_run").mkdir()
    json.dump({"script": "x", "args": {}}, open(tmp_path / "not_a_run" / "config.json", "w"))  # no rounds.csv
    s = collect.collect([str(tmp_path)])
    ceal = {r["labeled"]: r for r in s if r["strategy"] == "ceal" and r["data"] == "synthetic"}
    # sample std (ddof = 1): 0.5 and 0.7 -> sqrt(((-0.1)^2 + 0.1^2) / (2 - 1)) = 0.1414
    assert ceal[10]["n"] == 2 and ceal[10]["dice_mean"] == pytest.approx(0.6) and ceal[10]["dice_mean_std"] == pytest.approx(math.sqrt(0.02))
    assert ceal[10]["unfinished"] == 1 and ceal[30]["unfinished"] == 0 and math.isnan(ceal[30]["dice_mean_std"])
    assert ceal[20]["dice_mean"] == pytest.approx(0.7) and ceal[30]["n"] == 1 and ceal[30]["dice_mean"] == pytest.approx(0.7)
    assert ceal[10]["iou_mean"] == pytest.approx(0.5)
    assert len(s) == 3 * 4 and {r["script"] for r in s} == {"ceal_mcdropout", "ssl_coldstart"}
    assert len(collect.collect([str(tmp_path)], data="lgg")) == 3
    final = collect.collect([str(tmp_path)], by=["script", "strategy", "data"], final=True)
    row = next(r for r in final if r["strategy"] == "ceal" and r["data"] == "synthetic")
    assert row["n"] == 1 and row["dice_mean"] == pytest.approx(0.7)  # a1 (no summary.json) is not a final result
    table = common.markdown_table(s, ["script", "strategy", "labeled", "n", "dice_mean"])
    assert "| ceal_mcdropout | ceal | 10 | 2 | 0.6000 ± 0.1414 |" in table
    assert "| ceal_mcdropout | ceal | 30 | 1 | 0.7000 |" in table  # one run: the mean alone


def test_a_key_of_mixed_types_groups_without_a_crash(tmp_path):
    """A seed written "1" by hand beside runs of seed 0 and 2: was a TypeError ('<' between str and int) in the
    sort of the groups; numbers come first, by value, then the rest as text."""
    for name, seed in (("a", 2), ("b", "1"), ("c", 0)):
        fake_run(tmp_path, name, "example_tta", "tta", seed, [0.5, 0.6, 0.7])
    s = collect.collect([str(tmp_path)], by=["seed"], final=True)
    assert [r["seed"] for r in s] == [0, 2, "1"]


def test_cli_writes_table_csv_and_figure(tmp_path, capsys):
    for seed, dices in enumerate(([0.5, 0.6, 0.7], [0.6, 0.65, 0.8])):
        fake_run(tmp_path / "runs", f"r{seed}", "polyp_weighted_cluster", "method", seed, dices)
    out = tmp_path / "results"
    collect.main([str(tmp_path / "runs"), "--out", str(out)])
    for f in ("results.md", "results.csv", "curves.png"):
        assert (out / f).stat().st_size > 0
    assert "| 2 | 0.5500 ± 0.0707 |" in (out / "results.md").read_text()  # 0.5, 0.6: sample std 0.0707
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["labeled"] for r in rows] == ["10", "20", "30"]


def test_unfinished_runs_out_of_final_and_marked_per_round(tmp_path, capsys):
    fake_run(tmp_path, "done0", "example_tta", "tta", 0, [0.5, 0.6, 0.7])
    fake_run(tmp_path, "done1", "example_tta", "tta", 1, [0.5, 0.6, 0.9])
    fake_run(tmp_path, "crashed", "example_tta", "tta", 2, [0.5, 0.1], finished=False)
    final = collect.main([str(tmp_path), "--final", "--by", "script", "strategy"])
    out = capsys.readouterr()
    assert final[0]["n"] == 2 and final[0]["dice_mean"] == pytest.approx(0.8) and final[0]["unfinished"] == 0
    assert "left out 1 unfinished run(s)" in out.err and "crashed" in out.err
    assert "unfinished" not in out.out  # the final table holds finished runs only
    per_round = collect.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert {r["labeled"]: r["unfinished"] for r in per_round} == {10: 1, 20: 1, 30: 0}
    assert "of which unfinished" in out and "| example_tta | tta | synthetic | 20 | 3 | 0.4333 ± 0.2887 |" in out
    assert "runs without a readable summary.json" in out


def _args(**kw):
    base = dict(resume=None, out=None, data="synthetic", strategy="s", seed=0, device="cpu", workers=0, amp=False)
    return argparse.Namespace(**dict(base, **kw))


def test_run_csv_line_ends_and_resume_keeps_the_runs_amp(tmp_path, capsys, monkeypatch):
    run = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu"))
    run.append_csv("a.csv", [{"round": 0, "v": 1.5}, {"round": 1, "v": 2.0}])
    run.append_csv("a.csv", {"round": 2, "v": 3})
    run.truncate_csv("a.csv", 1)  # what --resume does to an unfinished round
    run.append_csv("a.csv", {"round": 2, "v": 4})
    raw = open(run.path("a.csv"), "rb").read()
    assert raw == b"round,v\n0,1.5\n1,2\n2,4\n"  # "\n" everywhere, never csv's default "\r\n"
    again = _args(resume=run.dir, amp=True, device="cuda:1", workers=3, seed=5, _typed=["amp", "device", "seed", "workers"])
    common.Run("x.py", again, torch.device("cpu"))
    assert f"resume: --amp --seed ignored: {run.dir} keeps the flags it started with" in capsys.readouterr().out
    assert (again.amp, again.seed, again.device, again.workers) == (False, 0, "cuda:1", 3)  # device, workers may change
    assert example_tta.parse_args(["--resume", "x", "--epochs", "3", "--rou=2", "--amp"])._typed == \
        ["amp", "epochs", "resume", "rounds"]  # the flags typed, an abbreviation too
    threads, cfg = torch.get_num_threads(), common.read_json(run.path("config.json"))
    monkeypatch.setattr(common.os, "cpu_count", lambda: threads + 1)
    try:  # a CPU run resumes on the thread count it started with: CPU sums, and so picks, depend on it
        for started, on, now, says in (
                (threads + 1, "cpu", threads + 1, f"resume: {threads + 1} threads, as the run started with (not {threads})"),
                (threads + 2, "cpu", threads, f"resume: the run started with {threads + 2} threads, more than this "
                                              f"machine's {threads + 1} cores"),
                (threads + 1, "cuda", threads, None)):  # a GPU run's sums do not depend on the CPU's threads
            run.write_json("config.json", dict(cfg, threads=started, device=on))
            common.Run("x.py", _args(resume=run.dir), torch.device("cpu"))
            out = capsys.readouterr().out
            assert torch.get_num_threads() == now and (says in out if says else "threads" not in out), out
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)
    run.write_json("config.json", cfg)


def test_resume_drops_an_unfinished_rounds_rows_whole_or_not_at_all(tmp_path, monkeypatch):
    """truncate_csv writes a copy and replaces the file: a kill while it writes leaves every finished row."""
    run = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu"))
    run.append_csv("a.csv", [{"round": r, "v": r / 2} for r in range(3)])
    before = open(run.path("a.csv"), "rb").read()

    class Killed(runfolder.csv.DictWriter):
        def writerows(self, rows):
            raise KeyboardInterrupt  # the kill, halfway through the rewrite

    monkeypatch.setattr(runfolder.csv, "DictWriter", Killed)
    run.truncate_csv("a.csv", 2)  # nothing to drop: the file is not touched
    with pytest.raises(KeyboardInterrupt):
        run.truncate_csv("a.csv", 1)
    assert open(run.path("a.csv"), "rb").read() == before
    monkeypatch.undo()
    run.truncate_csv("a.csv", 1)
    assert open(run.path("a.csv"), "rb").read() == b"round,v\n0,0\n1,0.5\n"
    # a kill inside an append: round 12's row "12,6.0" cut to "1", which must not pass for a row of round 1
    run.append_csv("b.csv", [{"round": r, "v": r / 2} for r in range(12)])
    with open(run.path("b.csv"), "a") as f:
        f.write("1")
    run.append_csv("rounds.csv", [dict({c: 0 for c in COLS}, round=r) for r in range(12)])  # the checkpoint's round's row
    torch.save({"rng_python": random.getstate(), "rng_numpy": np.random.get_state(), "rng_torch": torch.get_rng_state(),
                "round": 11}, run.path("checkpoint.pt"))
    common.Run("x.py", _args(resume=run.dir), torch.device("cpu")).load_checkpoint()
    assert [r["round"] for r in run.read_csv("b.csv")] == [str(r) for r in range(12)]


def test_a_csv_made_but_killed_before_its_header_gets_one(tmp_path):
    """SIGTERM between opening a new CSV and writing its header left it empty; the rows appended after --resume
    then had no header (epochs.csv of region_uncertainty.py, found by a kill-and-resume hunt)."""
    run = common.Run("x.py", _args(out=str(tmp_path)), torch.device("cpu"))
    for name in ("epochs.csv", "queried.csv"):
        open(run.path(name), "w").close()
    run.append_csv("epochs.csv", {"round": 0, "epoch": 1, "loss": 0.5})
    run.log_round({c: 0 for c in COLS})  # a round that queries nothing (--strategy full): the header alone
    assert open(run.path("queried.csv")).read() == "round,sample_id,how\n"
    run.log_round({c: 1 for c in COLS}, queried={"oracle": ["a"]})
    assert open(run.path("epochs.csv")).read() == "round,epoch,loss\n0,1,0.5\n"
    assert open(run.path("queried.csv")).read() == "round,sample_id,how\n1,a,oracle\n"


def test_round_row_and_summary(tmp_path, monkeypatch):
    """common.round_row: the shared columns first, nan (no numpy warning) without a test set; summary.json gets
    the GPU's peak memory on CUDA only (CUDA's counter replaced: this machine has no GPU)."""
    row = common.round_row(1, 20, 5, torch.tensor([0.5, 1.0]).numpy(), torch.tensor([0.25, 1.0]).numpy(), 2.0, 3.0,
                           val_dice=0.7)
    assert list(row) == COLS + ["val_dice"] and (row["dice_mean"], row["dice_std"], row["iou_mean"]) == (0.75, 0.25, 0.625)
    empty = common.round_row(0, 6, 0, torch.zeros(0).numpy(), torch.zeros(0).numpy(), 1.0, 0.0)
    assert all(math.isnan(empty[k]) for k in ("dice_mean", "dice_std", "iou_mean"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2 ** 30)
    for device, peak in (("cpu", None), ("cuda", 3.0)):
        run = common.Run("x.py", _args(out=str(tmp_path / device)), torch.device("cpu"))
        run.device = torch.device(device)  # as if the run had trained there
        run.log_round(row)
        run.finish()
        assert json.load(open(run.path("summary.json"))).get("peak_device_gib") == peak
    run.log_round(empty)  # no test set: nan in rounds.csv, null in summary.json (NaN is not JSON: jq refuses it)
    run.finish({"val": [math.nan, 1.0], "inf": math.inf})
    text = open(run.path("summary.json")).read()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert [summary[k] for k in ("final_dice", "final_iou", "val", "inf")] == [None, None, [None, 1.0], None]


def test_runs_of_other_settings_are_never_pooled(tmp_path):
    """Seeds pool into one mean ± std; a run of the same strategy with another flag (here --lr) does not: a
    clear error gives the reason on its first line, then each setting with at most three of its runs, unless
    that flag is a grouping key (--by)."""
    a = fake_run(tmp_path, "a", "x", "rule", 0, [0.5, 0.6, 0.7])
    fake_run(tmp_path, "b", "x", "rule", 1, [0.5, 0.6, 0.8])
    assert [r["n"] for r in collect.collect([str(tmp_path)])] == [2, 2, 2]
    for seed in range(2, 7):  # five more runs of b's setting
        fake_run(tmp_path, f"c{seed}", "x", "rule", seed, [0.5, 0.6, 0.8])
    for d in sorted(tmp_path.iterdir()):
        cfg = json.load(open(d / "config.json"))
        cfg["args"]["lr"] = 0.01 if d == a else 0.001
        json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(common.UserError) as e:
        collect.main([str(tmp_path)])
    first, *settings = str(e.value).splitlines()
    assert "ran with other --lr;" in first and "collect each setting's folders apart" in first
    assert str(tmp_path) not in first  # the reason alone, not hidden at the end of the paths
    c = [str(tmp_path / f"c{seed}") for seed in range(2, 7)]
    assert settings == [f"  --lr 0.001: 6 run(s): {tmp_path / 'b'}, {c[0]}, {c[1]} and 3 more",
                        f"  --lr 0.01: 1 run(s): {a}"]
    assert [r["n"] for r in collect.collect([str(tmp_path)], by=collect.KEYS + ["lr"])] == [6, 1] * 3


def test_folder_runs_on_two_data_folders_are_two_datasets(tmp_path):
    """Every user's dataset is --data folder: two datasets (their images' crc32 in config.json differ) are never
    pooled as seeds; the same images in two folders (moved, copied to a cluster) are; runs of which one has no
    crc32 (written before it) are told by their --data-dir. A named dataset's --data-dir only says where it lies."""
    def runs(sub, where, data="folder"):
        for seed, (data_dir, crc) in enumerate(where):
            d = fake_run(tmp_path / sub, f"r{seed}", "x", "rule", seed, [0.5, 0.6, 0.7], data=data)
            cfg = json.load(open(d / "config.json"))
            cfg["args"]["data_dir"] = data_dir
            json.dump(dict(cfg, images_crc32=crc) if crc else cfg, open(d / "config.json", "w"))
        return str(tmp_path / sub)
    n = lambda path, **k: [r["n"] for r in collect.collect([path], **k)]
    assert n(runs("named", [("/data/kvasir", "1"), ("/data/kvasir", "2"), ("/moved/kvasir", None)], "kvasir-seg")) \
        == [3] * 3
    assert n(runs("moved", [("/data/bones", "aa"), ("/scratch/bones", "aa")])) == [2] * 3
    other = runs("other", [("/data/bones", "aa"), ("/data/bones", "aa"), ("/data/polyps", "bb")])
    with pytest.raises(common.UserError, match="ran with other --data-dir;") as e:
        collect.collect([other])
    assert "  --data-dir '/data/polyps' (images crc32 bb): 1 run(s)" in str(e.value)
    assert n(other, by=collect.KEYS + ["data_dir"]) == [2, 1] * 3
    with pytest.raises(common.UserError, match="ran with other --data-dir;"):
        collect.collect([runs("older", [("/data/bones", "aa"), ("/data/polyps", None)])])


def _exit(argv, capsys):
    """collect.py's command line as a user runs it: the exit status and stderr."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: collect.main(argv))
    return e.value.code, capsys.readouterr().err


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    fake_run(tmp_path / "runs", "a", "x", "rule", 0, [0.5, 0.6, 0.7])
    (tmp_path / "file").write_text("")
    code, err = _exit([str(tmp_path / "runs"), "--out", str(tmp_path / "file")], capsys)
    assert code == 2 and err == f"error: --out {tmp_path / 'file'}: a file; expected a folder for results.md, " \
                                f"results.csv and curves.png\n"
    assert capsys.readouterr().out == ""  # said before the table, not after it
    code, err = _exit([str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "sub")], capsys)
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'file' / 'sub'}: cannot write results.md, "
                                        f"results.csv and curves.png there (Not a directory)")
    assert "expected a folder" in err and "Traceback" not in err


def test_an_unknown_by_key_is_a_clear_error(tmp_path, capsys):
    """Before, --by nosuchkey grouped every run under None."""
    fake_run(tmp_path / "runs", "a", "x", "rule", 0, [0.5, 0.6, 0.7])
    code, err = _exit([str(tmp_path / "runs"), "--by", "strategy", "nosuchkey"], capsys)
    assert code == 2 and err.startswith("error: --by nosuchkey: no such flag or rounds.csv column")
    valid = set(err.split("expected some of: ")[1].split())
    assert {"script", "strategy", "seed", "data", "labeled", "dice_mean"} <= valid and "flags" not in valid


def test_a_run_with_a_broken_config_is_left_out_with_a_warning(tmp_path, capsys):
    """A config.json cut short (a crash, a full disk) or without flags leaves its run out, with one warning line
    naming the file; the other runs still make the table."""
    for seed in (0, 1):
        fake_run(tmp_path, f"r{seed}", "x", "rule", seed, [0.5 + seed / 10])
    for name, text in (("cut", '{"script": "x", "ar'), ("noflags", '{"script": "x"}')):
        (fake_run(tmp_path, name, "x", "rule", 2, [0.9]) / "config.json").write_text(text)
    summary = collect.main([str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert [(r["n"], r["dice_mean"]) for r in summary] == [(2, pytest.approx(0.55))]
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    assert f"{tmp_path / 'cut' / 'config.json'}: not a run's config" in err[0] and "noflags" in err[1]


def test_a_cut_rounds_line_and_a_damaged_summary_do_not_count(tmp_path, capsys):
    """A rounds.csv whose last line was cut short (a kill while it was written) gives no round for it, with a
    warning naming the file; a summary.json that does not parse does not mark its run finished."""
    for seed in (0, 1):
        fake_run(tmp_path, f"r{seed}", "x", "rule", seed, [0.5, 0.6 + seed / 10])
    cut = fake_run(tmp_path, "cut", "x", "rule", 2, [0.5, 0.9, 0.9], finished=False) / "rounds.csv"
    cut.write_text(cut.read_text()[:-12])  # round 2's line loses its last fields
    (fake_run(tmp_path, "damaged", "x", "rule", 3, [0.5, 0.9]) / "summary.json").write_text('{"final_di')
    per_round = collect.collect([str(tmp_path)])
    assert [(r["labeled"], r["n"]) for r in per_round] == [(10, 4), (20, 4)]  # no row at 30 labelled
    assert [(r["labeled"], r["unfinished"]) for r in per_round] == [(10, 2), (20, 2)]
    final = collect.collect([str(tmp_path)], by=["script"], final=True)
    assert [(r["n"], r["dice_mean"]) for r in final] == [(2, pytest.approx(0.65))]  # r0 and r1 only
    err = capsys.readouterr().err
    assert f"warning: {cut}: 1 line(s) without the header's {len(COLS)} fields" in err


def test_a_run_named_twice_counts_once(tmp_path):
    """`runs runs/`, `runs runs/RUN` and a link to runs name the same runs: each counts once, with or without
    --final (before, the per-round table said n = 2 and ± 0 for one run)."""
    for seed in (0, 1):
        fake_run(tmp_path / "runs", f"r{seed}", "x", "rule", seed, [0.5 + seed / 10, 0.7])
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    runs = str(tmp_path / "runs")
    for paths in ([runs, runs + "/"], [runs, runs + "/r0/"], [runs, str(tmp_path / "link")]):
        assert [r["n"] for r in collect.collect(paths)] == [2, 2]
        assert [r["n"] for r in collect.collect(paths, by=["script"], final=True)] == [2]
    assert [r["n"] for r in collect.collect([runs + "/r0", runs + "/r0/"])] == [1, 1]


def test_a_seed_run_twice_is_named(tmp_path, capsys):
    """Two runs of one seed (a run started again instead of --resume, or GPU repeats) both count in n and the
    std: one note line on stderr names the seed and its runs, per-round or --final; other seeds, the same seed
    of another script, and one run's rounds in one cell (--by without labeled) give none."""
    for name, script, seed in (("a", "x", 0), ("again", "x", 0), ("b", "x", 1), ("other", "y", 0)):
        fake_run(tmp_path, name, script, "rule", seed, [0.5, 0.6])
    for kw in ({}, {"final": True, "by": ["script"]}, {"by": ["strategy", "labeled"]}):  # the last: x and y in a cell
        collect.collect([str(tmp_path)], **kw)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("note: seed 0 ran 2 times: ") and "again" in err[0]
        assert str(tmp_path / "a") in err[0] and "other" not in err[0]
    (tmp_path / "again" / "rounds.csv").unlink()
    collect.collect([str(tmp_path)], by=["script"])
    assert capsys.readouterr().err == ""
    for seed in range(2, 9):  # seven seeds run twice: five notes, and one line saying how many were left out
        for k in range(2):
            fake_run(tmp_path, f"s{seed}_{k}", "x", "rule", seed, [0.5, 0.6])
    collect.collect([str(tmp_path)], by=["script"], final=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "note: 2 more seed(s) ran more than once; the first 5 follow" and len(err) == 6, err
    assert all(line.startswith("note: seed ") for line in err[1:])


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="no finished rounds"):
        collect.main([str(tmp_path)])
    (tmp_path / "file").write_text("")
    for path, what in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "file", "a file")):
        with pytest.raises(common.UserError, match=f"^{path}: {what}; expected run folders, or folders that"):
            collect.main([str(tmp_path), str(path)])


def test_example_method_end_to_end_and_resume(tmp_path):
    """The "add your method" example runs, resumes, and its TTA score is 0 for a flip-invariant model."""
    from conftest import run_dir_from, run_script
    import numpy as np
    import torch

    class FlipInvariant(torch.nn.Module):
        def forward(self, x):
            return x.mean(1, keepdim=True) - 0.5  # pixel-wise: flipping commutes with it

    x = torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8)
    assert np.allclose(example_tta.tta_variance(FlipInvariant(), x, np.arange(5), 2, torch.device("cpu")), 0)

    class LeftBias(torch.nn.Module):  # predicts foreground on the left half whatever the input: flips disagree
        def forward(self, x):
            out = torch.full_like(x[:, :1], -5.0)
            out[..., : x.shape[-1] // 2] = 5.0
            return out
    s = example_tta.tta_variance(LeftBias(), x, np.arange(5), 2, torch.device("cpu"))
    assert np.all(s > 10)

    tiny = ["--split", 30, 5, 10, "--image-size", 32, "--width", 4, "--initial", 6, "--query", 4, "--rounds", 2,
            "--epochs-initial", 1, "--epochs", 1, "--batch-size", 8]
    full = run_dir_from(run_script("example_tta.py", *tiny, "--out", tmp_path / "a"))
    out = run_script("example_tta.py", *tiny, "--out", tmp_path / "b", check=False, env_extra={"ALSEG_STOP_AFTER_ROUND": "1"})
    assert out.returncode == 3
    part = str(next((tmp_path / "b").iterdir()))
    run_script("example_tta.py", "--resume", part)
    read = lambda d, f: open(os.path.join(d, f)).read()
    assert read(full, "queried.csv") == read(part, "queried.csv") and read(full, "queried.csv").count("\n") == 1 + 6 + 2 * 4
    import interface
    interface.assert_interface("example_tta.py", [full, part])


def test_tta_variance_by_hand():
    """A model that predicts the top-left quadrant whatever the input: with the flips undone, the four views
    (none, horizontal, vertical, both) put it in each quadrant once, so every pixel sees a = sigmoid(5) once and
    b = sigmoid(-5) three times: the variance over the four views (ddof 0) is 3/16 (a - b)^2 a pixel, summed
    over the image's 64 pixels. (Three views, or the standard deviation, give other numbers.)"""
    class TopLeft(torch.nn.Module):
        def forward(self, x):
            out = torch.full_like(x[:, :1], -5.0)
            out[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 5.0
            return out

    class Scaled(TopLeft):  # logits +-5 x the image's mean intensity (flip-invariant): one score per image
        def forward(self, x):
            return super().forward(x) * x.mean((1, 2, 3), keepdim=True)

    a, b = torch.sigmoid(torch.tensor(5.0)).item(), torch.sigmoid(torch.tensor(-5.0)).item()
    x = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    s = example_tta.tta_variance(TopLeft(), x, np.arange(3), 2, torch.device("cpu"))
    assert s == pytest.approx([64 * 3 / 16 * (a - b) ** 2] * 3, rel=1e-5)
    # each score belongs to its own image, in pool order, whatever the batches
    x = torch.tensor([255, 128, 51], dtype=torch.uint8)[:, None, None, None].expand(3, 3, 8, 8).contiguous()
    m = torch.tensor([255, 128, 51]) / 255
    want = (64 * 3 / 16 * (torch.sigmoid(5 * m) - torch.sigmoid(-5 * m)) ** 2).tolist()
    for pool in ([0, 1, 2], [2, 0, 1]):
        s = example_tta.tta_variance(Scaled(), x, np.array(pool), 2, torch.device("cpu"))
        assert s == pytest.approx([want[i] for i in pool], rel=1e-5), pool


def test_example_method_queries_the_top_k_of_a_known_score(tmp_path, monkeypatch):
    """example_tta.main() in-process with the score replaced by a fixed permutation of the data indices: each
    round queries exactly the `--query` largest scores of its pool, and pool_scores.csv holds the pool and
    the picks (the run folder alone shows that the rule was followed)."""
    import numpy as np
    perm = np.random.default_rng(7).permutation(1000).astype(float)
    monkeypatch.setattr(example_tta, "tta_variance", lambda model, x, pool, bs, device, amp=False: perm[np.asarray(pool)])
    run = example_tta.main(["--split", "30", "5", "10", "--image-size", "32", "--width", "4", "--initial", "6",
                            "--query", "4", "--rounds", "2", "--epochs-initial", "1", "--epochs", "1",
                            "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)])
    q = list(csv.DictReader(open(os.path.join(run, "queried.csv"))))
    ps = list(csv.DictReader(open(os.path.join(run, "pool_scores.csv"))))
    index = {sid: i for i, sid in enumerate(f"syn{i:05d}" for i in range(45))}
    assert set(index) >= {r["sample_id"] for r in ps}
    pool = set(json.load(open(os.path.join(run, "splits.json")))["train"]) - {r["sample_id"] for r in q if r["round"] == "0"}
    for rnd in ("1", "2"):
        rows = [r for r in ps if r["round"] == rnd]
        assert {r["sample_id"] for r in rows} == pool and len(pool) == 24 - 4 * (int(rnd) - 1)
        assert all(float(r["tta_variance"]) == perm[index[r["sample_id"]]] for r in rows)
        top = set(sorted(pool, key=lambda sid: -perm[index[sid]])[:4])
        picked = {r["sample_id"] for r in q if r["round"] == rnd and r["how"] == "oracle-tta"}
        assert picked == top == {r["sample_id"] for r in rows if r["picked"] == "oracle-tta"}
        assert os.path.isfile(os.path.join(run, "picks", f"round_{rnd}.png"))
        pool -= picked


def test_vs_random_verdicts_and_ceiling(tmp_path):
    """Each rule against its own script's random, per labelled count: 'trails' only where the rule's mean is
    below random's by more than the larger sample std; the ceiling (full) beside it; one panel per script."""
    for seed in (0, 1):
        # at 10 labelled: same start; at 20: rule 0.40/0.42 vs random 0.60/0.62 (trails); at 30: within 1 std
        fake_run(tmp_path, f"m{seed}", "example_tta", "tta", seed, [0.5, 0.40 + 0.02 * seed, 0.6 + 0.2 * seed])
        fake_run(tmp_path, f"r{seed}", "example_tta", "random", seed, [0.5, 0.60 + 0.02 * seed, 0.65 + 0.2 * seed])
        fake_run(tmp_path, f"f{seed}", "example_tta", "full", seed, [0.9], labeled=(300,))
        fake_run(tmp_path, f"o{seed}", "ceal_mcdropout", "ceal", seed, [0.5, 0.8 + 0.01 * seed, 0.9])  # leads at 20
        fake_run(tmp_path, f"p{seed}", "ceal_mcdropout", "random", seed, [0.5, 0.6 + 0.01 * seed, 0.9])
    rows = {(r["script"], r["labeled"]): r for r in collect.vs_random(collect.collect([str(tmp_path)]))}
    assert {k: r["verdict"] for k, r in rows.items() if k[0] == "example_tta"} == {
        ("example_tta", 10): "within 1 std", ("example_tta", 20): "trails", ("example_tta", 30): "within 1 std"}
    assert rows[("ceal_mcdropout", 20)]["verdict"] == "leads" and rows[("example_tta", 20)]["diff"] == "-0.200"
    assert rows[("example_tta", 20)]["ceiling"] == "0.900 ± 0.000 (300)" and rows[("ceal_mcdropout", 20)]["ceiling"] == ""
    collect.main([str(tmp_path), "--out", str(tmp_path / "out"), "--vs-random"])
    assert "| example_tta | synthetic | tta | 20 | 2 / 2 |" in open(tmp_path / "out" / "vs_random.md").read()
    assert os.path.getsize(tmp_path / "out" / "curves_by_script.png") > 1000


def test_chart_ticks_colours_and_the_dashed_ceiling(tmp_path):
    """collect.py's per-script panels: tick labels keep a narrow Dice range apart, each of up to 12 series has
    its own colour, and the ceiling ("full (N)") is dashed."""
    import plots
    ticks = plots._ticks(0.2166, 0.2172)
    assert len({plots._fmt(t, ticks) for t in ticks}) == len(ticks) > 2
    assert [plots._fmt(t, plots._ticks(0, 1)) for t in plots._ticks(0, 1)] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert plots._fmt(0.25, [0, 0.25]) == "0.25" and plots._fmt(40, [0, 20, 40]) == "40"
    assert len(set(plots.COLOURS)) >= 12
    series = {f"s{k}": ([0, 100], [k / 20, k / 20 + 0.01]) for k in range(10)}
    series["full (200)"] = ([0, 100], [0.8, 0.8])
    common.plot(tmp_path / "c.png", series, size=(480, 330), dashed=["full (200)"])
    a = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    colour = np.array(plots.COLOURS[10])
    rows = np.flatnonzero((np.abs(a - colour) < 3).all(2).sum(1) > 50)  # the ceiling's row(s), at 0.8
    on = (np.abs(a[rows[0]] - colour) < 3).all(1)
    along = on[np.flatnonzero(on)[0]: np.flatnonzero(on)[-1]]
    assert along.mean() < 0.9 and (np.diff(along.astype(int)) == 1).sum() > 10  # broken into many dashes


def test_a_rounds_csv_that_is_not_numbers_leaves_out_its_lines_or_its_run(tmp_path, capsys):
    """A cell that is not a number leaves its line out (as a line cut short does), a rounds.csv that is not
    UTF-8 text or has no round and labeled columns its run, each with one warning line naming the file; the
    table of the others is printed, and every value collect_runs gives is a float (or "", not measured)."""
    for seed in (0, 1):
        fake_run(tmp_path, f"r{seed}", "x", "rule", seed, [0.5 + seed / 5, 0.6 + seed / 5])
    cell = fake_run(tmp_path, "cell", "x", "rule", 2, [0.1, 0.2, 0.3]) / "rounds.csv"
    lines = cell.read_text().splitlines(keepends=True)
    cell.write_text(lines[0] + lines[1] + lines[2].replace(",0.2,", ",abc,") + lines[3].replace(",0.3,", ",,"))
    garbage = fake_run(tmp_path, "garbage", "x", "rule", 3, [0.9]) / "rounds.csv"
    garbage.write_bytes(bytes(range(128, 256)) * 3)  # not UTF-8
    other = fake_run(tmp_path, "other", "x", "rule", 4, [0.9]) / "rounds.csv"
    other.write_text("a,b\n1,2\n")
    summary = collect.main([str(tmp_path), "--by", "labeled"])
    err = capsys.readouterr().err.splitlines()
    # 10: r0, r1 and cell (0.5, 0.7, 0.1); 20: r0 and r1 (cell's line left out); 30: cell's empty Dice (nan)
    assert [(r["labeled"], r["n"]) for r in summary] == [(10, 3), (20, 2), (30, 1)]
    assert math.isnan(summary[2]["dice_mean"])
    assert summary[0]["dice_mean"] == pytest.approx(1.3 / 3) and summary[1]["dice_mean"] == pytest.approx(0.7)
    assert len(err) == 3 and all(line.startswith("warning: ") for line in err)
    assert f"{cell}: 1 line(s) with a cell that is not a number (first: dice_mean = 'abc')" in err[0]
    assert f"{garbage}: not readable as CSV text" in err[1] and f"{other}: no round and labeled columns" in err[2]
    rows = common.collect_runs([str(tmp_path)])
    assert {type(r[c]) for r in rows for c in COLS if r[c] != ""} == {float}
    assert [r["dice_mean"] for r in rows if r["run"].endswith("cell")] == [0.1, ""]  # an empty cell: not measured


def test_a_run_without_config_json_is_named(tmp_path, capsys):
    """A folder with rounds.csv and no config.json: named on its own, the error says config.json is missing; in a
    parent folder (even named twice) one warning line per such run, and the table of the others."""
    bare = fake_run(tmp_path, "bare", "x", "rule", 0, [0.5])
    (bare / "config.json").unlink()
    with pytest.raises(common.UserError, match=f"^no finished rounds under {bare}: expected run folders with "
                                               "config.json and rounds.csv"):
        collect.main([str(bare)])
    assert capsys.readouterr().err == (f"warning: {bare}: rounds.csv without config.json; expected the config.json "
                                       "its script writes beside it; this run is left out\n")
    fake_run(tmp_path, "ok", "x", "rule", 1, [0.7])
    for paths in ([tmp_path], [tmp_path, bare]):  # in its parent folder; named twice: once
        summary = collect.main([*map(str, paths), "--by", "script"])
        assert [(r["n"], r["dice_mean"]) for r in summary] == [(1, pytest.approx(0.7))]
        assert capsys.readouterr().err.count(f"warning: {bare}: rounds.csv without config.json") == 1


def test_an_unreadable_summary_and_cut_lines_are_named_once_per_file(tmp_path, capsys):
    """A summary.json that does not parse is named as unreadable (not as missing), and three lines cut short in
    one rounds.csv make one warning line that counts them."""
    fake_run(tmp_path, "ok", "x", "rule", 0, [0.5, 0.6])
    damaged = fake_run(tmp_path, "damaged", "x", "rule", 1, [0.5, 0.9]) / "summary.json"
    damaged.write_text('{"final_di')
    cut = fake_run(tmp_path, "cut", "x", "rule", 2, [0.5, 0.6, 0.7]) / "rounds.csv"
    cut.write_text("".join(line.rsplit(",", 2)[0] + "\n" if k else line
                           for k, line in enumerate(cut.read_text().splitlines(keepends=True))))
    collect.main([str(tmp_path), "--final"])
    err = capsys.readouterr().err.splitlines()
    assert f"warning: {damaged}: unreadable (not JSON: cut short?)" in err[1] and "no summary.json" not in "".join(err)
    assert [line for line in err if str(cut) in line] == [
        f"warning: {cut}: 3 line(s) without the header's {len(COLS)} fields (cut short?) are not finished rounds; "
        "left out"]
    assert "left out 1 unfinished run(s) (no readable summary.json" in err[-1]
