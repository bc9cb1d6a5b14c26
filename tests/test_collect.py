"""collect.py and common.collect_runs / summarise / markdown_table on hand-made run folders."""
import csv
import json
import os

import pytest

import collect
import common

COLS = common.ROUND_COLUMNS


def fake_run(root, name, script, strategy, seed, dices, data="synthetic", labeled=(10, 20, 30)):
    d = root / name
    d.mkdir(parents=True)
    json.dump({"script": script, "args": {"data": data, "strategy": strategy, "seed": seed}}, open(d / "config.json", "w"))
    with open(d / "rounds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        for r, (n, dice) in enumerate(zip(labeled, dices)):
            w.writerow(dict(round=r, labeled=n, pseudo=0, dice_mean=dice, dice_std=0.1, iou_mean=dice - 0.1,
                            train_s=1, select_s=1))
    return d


def test_grouping_mean_std_and_missing_rounds(tmp_path):
    fake_run(tmp_path, "a0", "ceal_mcdropout", "ceal", 0, [0.5, 0.6, 0.7])
    fake_run(tmp_path, "a1", "ceal_mcdropout", "ceal", 1, [0.7, 0.8])          # interrupted: no round 2
    fake_run(tmp_path, "b0", "ceal_mcdropout", "random", 0, [0.4, 0.5, 0.6])
    fake_run(tmp_path, "c0", "ssl_coldstart", "random", 0, [0.3, 0.35, 0.4])
    fake_run(tmp_path, "d0", "ceal_mcdropout", "ceal", 0, [0.9, 0.9, 0.9], data="lgg")
    (tmp_path / "not_a_run").mkdir()
    json.dump({"script": "x", "args": {}}, open(tmp_path / "not_a_run" / "config.json", "w"))  # no rounds.csv
    s = collect.collect([str(tmp_path)])
    ceal = {r["labeled"]: r for r in s if r["strategy"] == "ceal" and r["data"] == "synthetic"}
    assert ceal[10]["n"] == 2 and ceal[10]["dice_mean"] == pytest.approx(0.6) and ceal[10]["dice_mean_std"] == pytest.approx(0.1)
    assert ceal[20]["dice_mean"] == pytest.approx(0.7) and ceal[30]["n"] == 1 and ceal[30]["dice_mean"] == pytest.approx(0.7)
    assert ceal[10]["iou_mean"] == pytest.approx(0.5)
    assert len(s) == 3 * 4 and {r["script"] for r in s} == {"ceal_mcdropout", "ssl_coldstart"}
    assert len(collect.collect([str(tmp_path)], data="lgg")) == 3
    final = collect.collect([str(tmp_path)], by=["script", "strategy", "data"], final=True)
    row = next(r for r in final if r["strategy"] == "ceal" and r["data"] == "synthetic")
    assert row["n"] == 2 and row["dice_mean"] == pytest.approx(0.75)  # last rounds: 0.7 and 0.8
    table = common.markdown_table(s, ["script", "strategy", "labeled", "n", "dice_mean"])
    assert "| ceal_mcdropout | ceal | 10 | 2 | 0.6000 ± 0.1000 |" in table


def test_cli_writes_table_csv_and_figure(tmp_path, capsys):
    for seed, dices in enumerate(([0.5, 0.6, 0.7], [0.6, 0.65, 0.8])):
        fake_run(tmp_path / "runs", f"r{seed}", "polyp_weighted_cluster", "method", seed, dices)
    out = tmp_path / "results"
    collect.main([str(tmp_path / "runs"), "--out", str(out)])
    for f in ("results.md", "results.csv", "curves.png"):
        assert (out / f).stat().st_size > 0
    assert "0.5500 ± 0.0500" in (out / "results.md").read_text()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["labeled"] for r in rows] == ["10", "20", "30"]


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="no finished rounds"):
        collect.main([str(tmp_path)])


def test_example_method_end_to_end_and_resume(tmp_path):
    """The "add your method" example runs, resumes, and its TTA score is 0 for a flip-invariant model."""
    from conftest import run_dir_from, run_script
    import numpy as np
    import torch
    import example_tta

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
    assert read(full, "queried.csv") == read(part, "queried.csv") and read(full, "queried.csv").count("\n") == 9
