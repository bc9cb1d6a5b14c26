"""One harness (issue 8): every script on the same folder-layout dataset, with its "other" defaults.

The split, the initial set and the query size are left to each script's DEFAULTS row "other" (split from
the data by common.default_split, counts as the paper's share of the pool by common.pool_share); only the
sizes that make a test fast (image size, width, epochs, rounds, passes) are given."""
import csv
import importlib
import json
import os

import numpy as np
import pytest

import common
import interface
from conftest import REAL, run_dir_from, run_script

FAST = ["--image-size", 32, "--width", 4, "--epochs-initial", 1, "--epochs", 1, "--rounds", 1, "--batch-size", 8]
# The split of the 48-image fixture: 20 % test (10), 16 % validation (8), the rest (30) to label; for DSAL,
# whose paper's data come as a folder, its paper's shares 139 / 20 / 50 of 209 (32 / 5 / 11).
SPLIT, SPLIT_DSAL = [30, 8, 10], [32, 5, 11]
SCRIPTS = {  # script: (flags that only make it fast or fit, initial, query): the paper's shares of the pool
    "ceal_mcdropout.py": (["--mc-passes", 2, "--pseudo-step", 1], 11, 1),        # 600 and 35 of 1600
    "ssl_coldstart.py": (["--ssl-epochs", 1, "--shuffle-blocks", 10], 6, 1),      # 300 and 35 of 1600
    "region_uncertainty.py": (["--mc-passes", 2, "--image-size", 64], 1, 1),    # 128 and 32 of 2594
    "polyp_weighted_cluster.py": (["--kmeans-init", 1], 2, 2),                  # 30 and 30 of 550
    "dsal_fingerbones.py": ([], 2, 2),                                          # 10 and 10 of 139
    "example_tta.py": ([], 3, 2),                                               # 10 % and 5 %
    "example_claspe.py": ([], 3, 2),                                            # 10 % and 5 %
}


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """48 synthetic lesion images written in the folder layout: images/<stem>.png, masks/<stem>_mask.png."""
    d = common.make_synthetic(48, 48, 3, seed=4)
    d.ids = [f"img{k:03d}" for k in range(len(d))]
    return common.write_folder(d, tmp_path_factory.mktemp("mine"))


def test_write_folder_round_trip(folder_data):
    d = common.load_data("folder", str(folder_data), 48)
    ref = common.make_synthetic(48, 48, 3, seed=4)
    assert d.ids == [f"img{k:03d}" for k in range(48)]
    assert np.array_equal(d.x, ref.x) and np.array_equal(d.y, ref.y)  # PNG is lossless, same size: no resize


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_script_on_one_folder_dataset(script, folder_data, tmp_path):
    extra, initial, query = SCRIPTS[script]
    run = run_dir_from(run_script(script, "--data", "folder", "--data-dir", folder_data, *FAST, *extra,
                                  "--out", tmp_path, env_extra={"OMP_NUM_THREADS": "2"}))  # two threads, as users run
    split = SPLIT_DSAL if script == "dsal_fingerbones.py" else SPLIT
    cfg = json.load(open(os.path.join(run, "config.json")))["args"]
    assert (cfg["split"], cfg["initial"], cfg["query"]) == (split, initial, query)  # derived values recorded
    rows = list(csv.DictReader(open(os.path.join(run, "rounds.csv"))))
    assert [int(r["labeled"]) for r in rows] == [initial, initial + query]  # one round shows the query size
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)
    splits = json.load(open(os.path.join(run, "splits.json")))
    assert [len(splits[k]) for k in ("train", "val", "test")] == split
    assert set(splits["train"]) <= {f"img{k:03d}" for k in range(48)}
    interface.assert_interface(script, run)


def test_pool_share():
    assert [common.pool_share(30, c, p) for c, p in ((600, 1600), (35, 1600), (128, 2594), (32, 2594))] == [11, 1, 1, 1]
    assert common.pool_share(1600, 600, 1600) == 600 and common.pool_share(3200, 35, 1600) == 70
    import dsal_fingerbones
    assert dsal_fingerbones.paper_split(209) == [139, 20, 50] and dsal_fingerbones.paper_split(48) == SPLIT_DSAL


# Each script on a real sample set its paper did not use (../shared/data/real-samples: 10 CVC-ClinicDB
# frames, 10 Kvasir-SEG images, 4 PH2 cases), with the "other" split (20 % test, 16 % validation) and counts.
REAL_RUNS = {  # script: (--data, folder, extra flags, split, initial, query, rounds)
    "ceal_mcdropout.py": ("kvasir-seg", "Kvasir-SEG", ["--mc-passes", 2, "--pseudo-step", 1], [6, 2, 2], 2, 1, 2),
    "ssl_coldstart.py": ("cvc-clinicdb", "CVC-ClinicDB", ["--ssl-epochs", 1, "--shuffle-blocks", 10,
                                                         "--clusters", 2], [6, 2, 2], 1, 1, 2),
    "region_uncertainty.py": ("kvasir-seg", "Kvasir-SEG", ["--mc-passes", 2, "--image-size", 64], [6, 2, 2], 1, 1, 2),
    "polyp_weighted_cluster.py": ("ph2", "PH2Dataset", ["--kmeans-init", 1], [2, 1, 1], 1, 1, 1),
    "dsal_fingerbones.py": ("cvc-clinicdb", "CVC-ClinicDB", [], [6, 2, 2], 1, 1, 2),
    "example_tta.py": ("ph2", "PH2Dataset", [], [2, 1, 1], 1, 1, 1),
}


@pytest.mark.parametrize("script", list(REAL_RUNS))
def test_every_script_on_a_real_dataset_it_was_not_written_for(script, tmp_path):
    data, folder, extra, split, initial, query, rounds = REAL_RUNS[script]
    if not os.path.isdir(os.path.join(REAL, folder)):
        pytest.skip(f"{REAL}/{folder} absent")
    fast = FAST[:FAST.index("--rounds")] + ["--rounds", rounds] + FAST[FAST.index("--rounds") + 2:]
    run = run_dir_from(run_script(script, "--data", data, "--data-dir", os.path.join(REAL, folder), *fast, *extra,
                                  "--out", tmp_path))
    cfg = json.load(open(os.path.join(run, "config.json")))["args"]
    assert (cfg["split"], cfg["initial"], cfg["query"]) == (split, initial, query)
    rows = list(csv.DictReader(open(os.path.join(run, "rounds.csv"))))
    assert [int(r["labeled"]) for r in rows] == [initial + k * query for k in range(rounds + 1)]
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)
    interface.assert_interface(script, run, help=False)  # --help: checked once per script above


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_random_baseline_queries_what_query_random_draws(script, folder_data, tmp_path, monkeypatch):
    """--strategy random is each paper's uniform baseline: every query round takes exactly the samples that
    common.query_random returns, from the round's whole pool. A stand-in draw (the pool's last k: no rule
    picks these) shows it in queried.csv; the query rule of the method in its place, or the draw's pool or
    size changed, fails here."""
    mod = importlib.import_module(script[:-3])
    calls = []

    def last_k(pool, k, rng):
        calls.append(len(pool))
        return np.asarray(pool)[-k:]
    monkeypatch.setattr(common, "query_random", last_k)
    extra, initial, query = SCRIPTS[script]
    flags = ["--data", "folder", "--data-dir", folder_data, *FAST, *extra, "--rounds", 2, "--strategy", "random",
             "--device", "cpu", "--out", tmp_path]
    run = mod.main([str(f) for f in flags])
    train = json.load(open(os.path.join(run, "splits.json")))["train"]
    rows = list(csv.DictReader(open(os.path.join(run, "queried.csv"))))
    labelled = {r["sample_id"] for r in rows if r["round"] == "0"}
    cold = script == "ssl_coldstart.py"  # --cold-start auto: random but for cluster, a draw at round 0 too
    assert len(labelled) == initial and len(calls) == 2 + cold
    if cold:
        assert calls[0] == len(train) and sorted(labelled) == sorted(train)[-initial:]
    for rnd in (1, 2):
        picked = [r["sample_id"] for r in rows if r["round"] == str(rnd)]
        pool = sorted(set(train) - labelled)
        assert calls[rnd - 1 + cold] == len(pool) and sorted(picked) == pool[-query:], rnd
        assert {r["how"] for r in rows if r["round"] == str(rnd)} == {"oracle-random"}
        labelled |= set(picked)
