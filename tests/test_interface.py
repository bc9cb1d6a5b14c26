"""The interface check (tests/interface.py) itself: a good run folder passes, and each missing file, column or
per-round record fails with a message that names it (a check that cannot fail checks nothing); every
script's --help lists the shared flags in the agreed order, and a help that does not is caught."""
import csv
import json
import os
import shutil

import pytest
from PIL import Image

import interface

# every script of the project: the .py files beside common.py that build their flags with common.shared_parser
SCRIPTS = sorted(f for f in os.listdir(interface.ROOT) if f.endswith(".py") and f != "common.py"
                 and "shared_parser(" in open(os.path.join(interface.ROOT, f)).read())


def write_csv(path, rows, columns=None):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def png(path):
    Image.new("RGB", (4, 4)).save(path)


def good_run(root):
    """A hand-written run folder of two rounds (as common.Run writes them) that keeps the interface."""
    run = root / "run"
    (run / "picks").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"script": "demo", "args": {"seed": 0}}))
    (run / "splits.json").write_text(json.dumps({"train": [f"s{k}" for k in range(8)], "val": ["v0"], "test": ["t0", "t1"]}))
    cols = interface.ROUND_COLUMNS + ["val_dice"]
    write_csv(run / "rounds.csv", [{"round": r, "labeled": 2 + 2 * r, "pseudo": 0, "dice_mean": d, "dice_std": 0.1,
                                    "iou_mean": d - 0.1, "train_s": 1.5, "select_s": 0.2 * r, "val_dice": d}
                                   for r, d in enumerate((0.5, 0.6, 0.7))], cols)
    write_csv(run / "queried.csv", [{"round": 0, "sample_id": "s0", "how": "initial"},
                                    {"round": 0, "sample_id": "s1", "how": "initial"},
                                    {"round": 1, "sample_id": "s2", "how": "oracle-x"},
                                    {"round": 1, "sample_id": "s3", "how": "oracle-x"},
                                    {"round": 2, "sample_id": "s4", "how": "oracle-x"},
                                    {"round": 2, "sample_id": "s5", "how": "pseudo"}])
    scores = [{"round": 1, "sample_id": f"s{k}", "score": k / 10, "picked": "oracle-x" if k in (2, 3) else ""}
              for k in range(2, 8)]
    scores += [{"round": 2, "sample_id": f"s{k}", "score": k / 10, "picked": {4: "oracle-x", 5: "pseudo"}.get(k, "")}
               for k in range(4, 8)]
    write_csv(run / "pool_scores.csv", scores)
    (run / "summary.json").write_text(json.dumps({"final_dice": 0.7}))
    (run / "checkpoint.pt").write_bytes(b"not empty")
    for name in ("learning_curve.png", "panel.png", "picks/round_1.png", "picks/round_2.png"):
        png(run / name)
    return run


@pytest.fixture
def run(tmp_path):
    return good_run(tmp_path)


def test_a_good_folder_passes(run):
    assert interface.check_run(str(run)) == []
    interface.assert_interface("ceal_mcdropout.py", run, help=False)


@pytest.mark.parametrize("name", interface.RUN_FILES + ["pool_scores.csv", "picks/round_2.png"])
def test_a_missing_file_fails_and_is_named(run, name):
    os.remove(run / name)
    problems = interface.check_run(str(run))
    assert problems and any(name in p for p in problems), problems
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        interface.assert_interface("ceal_mcdropout.py", run, help=False)


def test_an_empty_or_broken_file_fails(run):
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "panel.png").write_text("not a picture")
    problems = interface.check_run(str(run))
    assert any("checkpoint.pt is empty" in p for p in problems) and any("panel.png is not a PNG" in p for p in problems)


@pytest.mark.parametrize("oracle", ["folder", "simulated"])
def test_a_run_without_a_test_set_passes_only_for_a_person_labelling_images_only(run, oracle):
    """--oracle folder on images without masks: no test set, so no panel of test images; any other run needs both."""
    splits = json.load(open(run / "splits.json"))
    (run / "splits.json").write_text(json.dumps(dict(splits, train=splits["train"] + splits["test"], test=[])))
    cfg = json.load(open(run / "config.json"))
    (run / "config.json").write_text(json.dumps(dict(cfg, args=dict(cfg["args"], oracle=oracle))))
    os.remove(run / "panel.png")
    problems = interface.check_run(str(run))
    if oracle == "folder":
        assert problems == []
    else:
        assert any("no panel.png" in q for q in problems) and any("no test samples" in q for q in problems)


@pytest.mark.parametrize("column", interface.ROUND_COLUMNS)
def test_a_missing_rounds_column_fails(run, column):
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    write_csv(run / "rounds.csv", [{k: v for k, v in r.items() if k != column} for r in rows])
    assert any(f"lacks column {column}" in p for p in interface.check_run(str(run)))


def test_rounds_columns_in_the_agreed_order_and_rounds_numbered(run):
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    cols = list(rows[0])
    write_csv(run / "rounds.csv", rows, [cols[1], cols[0]] + cols[2:])
    assert any("do not come first" in p for p in interface.check_run(str(run)))
    write_csv(run / "rounds.csv", [rows[0], rows[2]], cols)  # round 1 lost (a resume that dropped it)
    assert any("expected 0..1" in p for p in interface.check_run(str(run)))
    write_csv(run / "rounds.csv", [rows[0], rows[1], dict(rows[2], dice_mean="1.5")], cols)
    assert any("bad dice_mean" in p for p in interface.check_run(str(run)))


def test_summary_and_queried_are_checked(run):
    (run / "summary.json").write_text(json.dumps({"final_dice_std": 0.1}))
    assert any("lacks final_dice" in p for p in interface.check_run(str(run)))
    (run / "summary.json").write_text(json.dumps({"final_dice": 0.6}))  # not the last round's 0.7
    assert any("not the last round's dice_mean" in p for p in interface.check_run(str(run)))
    (run / "summary.json").write_text(json.dumps({"final_dice": 0.7}))
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    write_csv(run / "rounds.csv", rows[:-1] + [dict(rows[-1], dice_mean="0", iou_mean="0")])
    (run / "summary.json").write_text(json.dumps({"final_dice": 0.0}))  # a collapsed model: 0 is a value
    assert interface.check_run(str(run)) == []
    (run / "summary.json").write_text(json.dumps({"final_dice": 0.7}))
    assert any("not the last round's dice_mean" in p for p in interface.check_run(str(run)))
    write_csv(run / "rounds.csv", rows)
    with open(run / "queried.csv", "a") as f:
        f.write("2,s5,pseudo\n")  # a pseudo-label drawn again (CEAL's redraw, DSAL): not an oracle query
    assert interface.check_run(str(run), pool_scores=False) == []
    with open(run / "queried.csv", "a") as f:
        f.write("2,s2,oracle-x\n")
    assert any("queried twice" in p for p in interface.check_run(str(run)))
    rows = list(csv.DictReader(open(run / "queried.csv")))[:-1]
    write_csv(run / "queried.csv", rows + [{"round": 2, "sample_id": "t0", "how": "oracle-x"}])
    assert any("outside the training split" in p for p in interface.check_run(str(run)))
    write_csv(run / "queried.csv", [{k: v for k, v in r.items() if k != "how"} for r in rows])
    assert any("queried.csv lacks column how" in p for p in interface.check_run(str(run)))


@pytest.mark.parametrize("rnd, how", [(0, "initial-random"), (0, "oracle"), (1, "initial"), (1, "full"), (1, "tta")])
def test_queried_how_is_one_vocabulary(run, rnd, how):
    rows = list(csv.DictReader(open(run / "queried.csv")))
    write_csv(run / "queried.csv", [dict(r, how=how) if r["sample_id"] == ("s0" if rnd == 0 else "s2") else r
                                    for r in rows])
    assert any(f"how ['{how}']" in p for p in interface.check_run(str(run), pool_scores=False))


def test_pool_scores_must_match_the_queries(run):
    rows = list(csv.DictReader(open(run / "pool_scores.csv")))
    write_csv(run / "pool_scores.csv", [dict(r, picked="") if r["sample_id"] == "s5" else r for r in rows])
    assert any("round 2: 1 picked, not the 2" in p for p in interface.check_run(str(run)))
    write_csv(run / "pool_scores.csv", [r for r in rows if r["round"] == "1"])
    assert any("rounds [1], expected [1, 2]" in p for p in interface.check_run(str(run)))
    write_csv(run / "pool_scores.csv", rows + [dict(rows[0], round=3)])  # a round rounds.csv does not have
    assert any("rounds [1, 2, 3]" in p for p in interface.check_run(str(run)))
    write_csv(run / "pool_scores.csv", [{k: v for k, v in r.items() if k != "picked"} for r in rows])
    assert any("expected round, sample_id, a score or more, picked" in p for p in interface.check_run(str(run)))


def test_the_per_round_checks_can_be_switched_off(run):
    os.remove(run / "pool_scores.csv")
    shutil.rmtree(run / "picks")
    assert len(interface.check_run(str(run))) == 3  # no pool_scores.csv, no picks/round_1.png, round_2.png
    assert interface.check_run(str(run), pool_scores=False, picks=False) == []
    assert [p for p in interface.check_run(str(run), picks=False)] == [f"{run}: no pool_scores.csv (rounds [1, 2] queried)"]
    png(run / "round_9.png")
    (run / "picks").mkdir()
    png(run / "picks" / "round_9.png")  # a round the run never had
    assert any("name no round" in p for p in interface.check_run(str(run), pool_scores=False))


def test_a_full_baseline_of_one_round_needs_no_per_round_files(run):
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    write_csv(run / "rounds.csv", rows[:1])
    write_csv(run / "queried.csv", [r for r in csv.DictReader(open(run / "queried.csv")) if r["round"] == "0"])
    (run / "summary.json").write_text(json.dumps({"final_dice": 0.5}))
    os.remove(run / "pool_scores.csv")
    shutil.rmtree(run / "picks")
    assert interface.check_run(str(run)) == []


def test_not_a_folder(tmp_path):
    assert interface.check_run(str(tmp_path / "nowhere")) == [f"{tmp_path / 'nowhere'}: no such folder"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_lists_the_shared_flags_in_order(script):
    assert interface.check_help(script) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_never_shows_a_default_of_none(script):
    """A DEFAULTS row left at None (the split, --initial, --query of "other": set from the data) reads
    "from the data" in --help, not None."""
    text, error = interface.help_text(script)
    assert error is None and "None" not in text and "from the data" in text


def test_help_as_a_user_runs_it():
    """Once through a subprocess (`python SCRIPT --help`), as the command line of interface.py does."""
    assert interface.check_help("example_tta.py", in_process=False) == []


def test_the_scripts_are_found():
    assert {"ceal_mcdropout.py", "ssl_coldstart.py", "region_uncertainty.py", "polyp_weighted_cluster.py",
            "dsal_fingerbones.py", "example_tta.py"} <= set(SCRIPTS)


def test_a_help_out_of_order_or_missing_a_flag_fails(tmp_path):
    flags = list(interface.SHARED_FLAGS)
    script = tmp_path / "bad_script.py"

    def write(fl):
        script.write_text("import argparse\n\ndef parse_args(argv=None):\n    p = argparse.ArgumentParser()\n"
                          + "".join(f"    p.add_argument({f!r}, help='see --data and --width')\n" for f in fl)
                          + "    return p.parse_args(argv)\n\n\nif __name__ == '__main__':\n    parse_args()\n")
    write(flags)
    assert interface.check_help(str(script)) == []
    write([flags[1], flags[0]] + flags[2:])
    assert any("not in the agreed order" in p for p in interface.check_help(str(script)))
    write([f for f in flags if f != "--width"])  # mentioned in a help string, but not an option
    assert interface.check_help(str(script)) == [f"{script}: flag --width missing from --help"]
    assert interface.check_help(str(script), in_process=False) == [f"{script}: flag --width missing from --help"]
