"""--oracle folder: a person answers the queries through files (oracle.ask). The test plays the annotator:
each time a run stops, it copies the ground-truth masks into labels/round_K/ and resumes; the finished run's
queried ids and Dice equal the simulated run's (tests/behaviour_record.json, same flags and seed). An
annotator who draws other masks than the files' is what every later round trains on. Bad label folders stop
with one message listing every problem, exit 2, and change nothing."""
import csv
import importlib
import json
import os
import shlex
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import common
import example_tta
import oracle
from loaders import resize_mask
from conftest import run_script
from test_behaviour import METHOD, TINY, record_of, recorded

SCRIPTS = ["ceal_mcdropout", "ssl_coldstart", "region_uncertainty", "polyp_weighted_cluster", "dsal_fingerbones",
           "example_tta", "example_claspe"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return common.write_folder(common.make_synthetic(60, 32, 3, seed=0), str(tmp_path_factory.mktemp("data")))


def annotate(run, folder):
    """Play the annotator for the round the run stopped at: the dataset's own mask of each asked image."""
    asks = sorted(os.listdir(os.path.join(run, "to_label")), key=lambda d: int(d.split("_")[1]))
    rnd = asks[-1]
    rows = list(csv.DictReader(open(os.path.join(run, "to_label", rnd, "manifest.csv"))))
    rounds = json.load(open(os.path.join(run, "config.json")))["args"]["rounds"]
    said = {"round_0": f"Rounds 1 to {rounds} ask again", f"round_{rounds - 1}": f"Round {rounds} asks again",
            f"round_{rounds}": "This is the last round: after it"}[rnd]
    assert said in open(os.path.join(run, "to_label", rnd, "README.txt")).read().replace("\n", " ")
    os.makedirs(os.path.join(run, "labels", rnd), exist_ok=True)
    for r in rows:  # round 0 asks before any training: no model image
        assert os.path.isfile(os.path.join(run, "to_label", rnd, r["image"])) and bool(r["model"]) == (rnd != "round_0")
        if r["model"]:  # left: the image itself, its long side 512 px, but for the prediction's yellow outline
            shown = np.asarray(Image.open(os.path.join(run, "to_label", rnd, r["model"])))
            image = Image.open(os.path.join(run, "to_label", rnd, r["image"]))
            w, h = (round(side * 512 / max(image.size)) for side in image.size)
            image = np.asarray(image.resize((w, h), Image.BILINEAR), np.float32).astype(np.uint8)
            left, yellow = shown[:, :w], (shown[:, :w] == (255, 255, 0)).all(2)
            assert shown.shape == (h, 2 * w, 3) and (left[~yellow] == image[~yellow]).all()
        shutil.copy(os.path.join(folder, "masks", f"{r['sample_id']}_mask.png"),
                    os.path.join(run, "labels", rnd, f"{r['sample_id']}.png"))
    return len(rows)


def test_the_resume_command_printed_and_in_the_readme_pastes_whole(folder, tmp_path, capsys):
    """A run folder whose path holds a space (--out "my runs"): the command the stop prints and README.txt's
    are quoted, so that pasted into a shell (shlex.split) they resume the run."""
    out = tmp_path / "my runs"
    with pytest.raises(SystemExit):
        example_tta.main([*map(str, TINY), "--data", "folder", "--data-dir", folder, "--out", str(out),
                          "--oracle", "folder"])
    run = str(next(out.iterdir()))
    said = capsys.readouterr().out
    assert "note: --oracle folder, and every image has a mask: the usual split; you label" in said  # not silent
    printed = said.strip().splitlines()[-1].split("go on with: ")[1]
    readme = open(os.path.join(run, "to_label", "round_0", "README.txt")).read()
    pasted = [line.strip() for line in readme.splitlines() if "--resume" in line][0]
    for command in (printed, pasted):
        assert shlex.split(command) == ["python", "example_tta.py", "--resume", run], command  # run: absolute
    annotate(run, folder)
    with pytest.raises(SystemExit):  # round 1 asks again
        example_tta.main(shlex.split(pasted)[2:])
    assert os.path.isdir(os.path.join(run, "to_label", "round_1"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_annotator_in_the_loop_gives_the_simulated_run(script, folder, tmp_path):
    main = importlib.import_module(script).main
    flags = [*map(str, TINY + METHOD.get(script, [])), "--data", "folder", "--data-dir", folder, "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:  # round 0 asks for the initial set
        main([*flags, "--oracle", "folder"])
    assert stop.value.code == 0
    run = str(next(tmp_path.iterdir()))
    assert "README.txt" in os.listdir(os.path.join(run, "to_label", "round_0"))
    stops, asked = 1, annotate(run, folder)
    while True:
        try:
            done = main(["--resume", run])
            break
        except SystemExit as e:
            assert e.code == 0
            stops, asked = stops + 1, asked + annotate(run, folder)
    assert done == run and stops == 3  # round 0, 1 and 2 each asked once
    # the end: a mask of every training image the person did not label (pseudo-labelled ones included), file size
    train = json.load(open(os.path.join(run, "splits.json")))["train"]
    drawn = {r["sample_id"] for r in csv.DictReader(open(os.path.join(run, "queried.csv"))) if r["how"] != "pseudo"}
    rows = list(csv.DictReader(open(os.path.join(run, "predicted", "manifest.csv"))))
    assert sorted(r["sample_id"] for r in rows) == sorted(set(train) - drawn) and len(rows) == len(train) - asked
    assert sorted(os.listdir(os.path.join(run, "predicted"))) == sorted([f"{r['mask']}" for r in rows]
                                                                        + ["README.txt", "manifest.csv"])
    for r in rows:
        with Image.open(os.path.join(run, "predicted", r["mask"])) as im:
            assert im.size == (32, 32) and set(np.unique(np.asarray(im))) <= {0, 255}
    assert [float(r["uncertainty"]) for r in rows] == sorted((float(r["uncertainty"]) for r in rows), reverse=True)
    # last: on a machine with no behaviour record whose floats match none, this skips (the checks above still ran)
    assert record_of(run) == recorded(script, record_of(run)), f"{script}: the annotated run differs from the simulated one"


def test_the_images_not_labelled_get_the_final_models_masks_at_their_own_size(tmp_path):
    """predicted/<id>.png: the final model's prediction (from checkpoint.pt) at --image-size, resized bilinearly to
    the image file's own size (here 40 x 24, not square) and thresholded at 0.5; the manifest's uncertainty is
    the mean binary entropy at --image-size, most uncertain first; nothing is written by --oracle simulated."""
    syn = common.make_synthetic(30, 32, 3, seed=1)
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for xi, yi, sid in zip(syn.x, syn.y, syn.ids):
        Image.fromarray(xi.transpose(1, 2, 0)).resize((40, 24), Image.BILINEAR).save(root / "images" / f"{sid}.png")
        Image.fromarray(yi * 255).resize((40, 24), Image.NEAREST).save(root / "masks" / f"{sid}_mask.png")
    flags = ["--device", "cpu", "--data", "folder", "--data-dir", str(root), "--split", "20", "4", "6",
             "--image-size", "32", "--width", "8", "--initial", "6", "--query", "4", "--rounds", "1",
             "--epochs-initial", "4", "--epochs", "2", "--batch-size", "8", "--lr", "0.01"]
    example_tta.main([*flags, "--out", str(tmp_path / "sim")])
    assert not os.path.exists(os.path.join(next((tmp_path / "sim").iterdir()), "predicted"))
    with pytest.raises(SystemExit):
        example_tta.main([*flags, "--oracle", "folder", "--out", str(tmp_path / "runs")])
    run = str(next((tmp_path / "runs").iterdir()))
    while True:
        annotate(run, str(root))
        try:
            example_tta.main(["--resume", run])
            break
        except SystemExit:
            pass
    data = common.load_data("folder", str(root), 32, 3, quiet=True)
    model = example_tta.UNet(3, 1, 8)
    model.load_state_dict(torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["model"])
    x, _ = common.to_device(data, torch.device("cpu"))
    rows = list(csv.DictReader(open(os.path.join(run, "predicted", "manifest.csv"))))
    where = {sid: i for i, sid in enumerate(data.ids)}
    idx = np.array([where[r["sample_id"]] for r in rows])
    probs = common.predict(model, x, idx, 8, torch.device("cpu")).numpy()
    assert len(rows) == 20 - 10
    for r, p in zip(rows, probs):
        want = np.array(Image.fromarray(p).resize((40, 24), Image.BILINEAR)) > 0.5
        got = np.asarray(Image.open(os.path.join(run, "predicted", r["mask"])))
        assert got.shape == (24, 40) and (got == want * 255).all(), r["sample_id"]
        assert float(r["uncertainty"]) == pytest.approx(float(common.binary_entropy(torch.from_numpy(p)).mean()), abs=1e-4)
        assert float(r["foreground"]) == pytest.approx(want.mean(), abs=1e-4)
    unc = [float(r["uncertainty"]) for r in rows]
    assert unc == sorted(unc, reverse=True) and len(set(unc)) > 1  # most uncertain first
    assert "most uncertain first" in open(os.path.join(run, "predicted", "README.txt")).read()


def draw(run, rnd, pattern):
    """Play an annotator who disagrees with the dataset: every image asked in round rnd gets `pattern` (a
    {0, 1} mask at the files' size), not its mask on disk. Returns the asked ids."""
    ids = [r["sample_id"] for r in csv.DictReader(open(os.path.join(run, "to_label", f"round_{rnd}", "manifest.csv")))]
    os.makedirs(os.path.join(run, "labels", f"round_{rnd}"))
    for sid in ids:
        Image.fromarray(pattern * 255).save(os.path.join(run, "labels", f"round_{rnd}", f"{sid}.png"))
    return ids


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_trains_on_the_persons_labels_of_every_finished_round(script, folder, tmp_path, monkeypatch):
    """Each round of --oracle folder is a new process (--resume), which reads the dataset's masks again: the
    labels the person drew in the earlier rounds must come back (oracle.restore), not the dataset's. The
    person here draws the left half of every image, which no mask on disk is; the third process's training
    targets are checked: every image asked in rounds 0 and 1 carries the person's label."""
    main = importlib.import_module(script).main
    flags = [*map(str, TINY + METHOD.get(script, [])), "--rounds", "1", "--data", "folder", "--data-dir", folder,
             "--out", str(tmp_path), "--oracle", "folder"]
    pattern = np.zeros((32, 32), np.uint8)
    pattern[:, :16] = 1
    with pytest.raises(SystemExit):
        main(flags)  # round 0 asks
    run = str(next(tmp_path.iterdir()))
    asked = draw(run, 0, pattern)
    with pytest.raises(SystemExit):
        main(["--resume", run])  # round 0 trains on them; round 1 asks
    asked += draw(run, 1, pattern)
    seen, real_ask = {}, oracle.ask

    def ask(run_, rnd, idx, data, y, *a, **k):
        seen["ids"] = data.ids
        return real_ask(run_, rnd, idx, data, y, *a, **k)

    class Trained(Exception):
        pass

    def train(model, opt, x, target, idx, *a, **k):
        if target.ndim == 3:  # the masks (SSL's pre-training trains on the images)
            seen["target"], seen["idx"] = target.clone(), np.asarray(idx)
            raise Trained
        return real_train(model, opt, x, target, idx, *a, **k)

    real_train = common.train_epochs
    monkeypatch.setattr(oracle, "ask", ask)
    monkeypatch.setattr(common, "train_epochs", train)
    with pytest.raises(Trained):
        main(["--resume", run])  # round 1 trains: on the labels of round 0 and of round 1
    at = [seen["ids"].index(sid) for sid in asked]
    want = torch.as_tensor(resize_mask(pattern, seen["target"].shape[-1]))
    assert len(asked) == 10 and set(at) <= set(seen["idx"].tolist())
    lost = [sid for sid, i in zip(asked, at) if not torch.equal(seen["target"][i].cpu(), want)]
    assert not lost, f"{script}: trained on other labels than the person's for {lost}"
    if script == "example_tta":  # an earlier round's labels gone: a clear error, not a traceback
        shutil.rmtree(os.path.join(run, "labels", "round_0"))
        monkeypatch.undo()
        with pytest.raises(common.UserError, match=r"labels/round_0: folder not found; expected the 6 label files"):
            main(["--resume", run])


def test_bad_label_files_one_message_nothing_changed(folder, tmp_path):
    flags = [*TINY, "--data", "folder", "--data-dir", folder, "--out", tmp_path, "--oracle", "folder"]
    out = run_script("example_tta.py", *flags, check=False)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("stopped: round 0 asks for 6 labels")
    run = str(next(tmp_path.iterdir()))
    ids = [r["sample_id"] for r in csv.DictReader(open(os.path.join(run, "to_label", "round_0", "manifest.csv")))]
    lab = os.path.join(run, "labels", "round_0")
    os.makedirs(lab)
    good = np.zeros((32, 32), np.uint8)
    good[8:20, 8:20] = 255
    Image.fromarray(good).save(os.path.join(lab, f"{ids[0]}.png"))                       # fine
    Image.fromarray((good // 2)).save(os.path.join(lab, f"{ids[1]}.png"))                # 0 / 127: not binary
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(os.path.join(lab, f"{ids[2]}.png"))  # 2:1, image 1:1
    open(os.path.join(lab, f"{ids[3]}.png"), "w").write("not a png")                      # unreadable
    Image.fromarray(good).save(os.path.join(lab, "someone_else.png"))                     # extra
    dark = np.zeros((32, 32, 3), np.uint8)
    dark[8:20, 8:20], dark[20:24, 20:24] = (100, 0, 0), (0, 90, 0)
    Image.fromarray(dark).save(os.path.join(lab, f"{ids[4]}.png"))                       # two dark colours
    # ids[5]: missing
    before, config = sorted(os.listdir(run)), open(os.path.join(run, "config.json")).read()
    out = run_script("example_tta.py", "--resume", run, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    msg = out.stderr
    assert "6 problem(s)" in msg and lab in msg
    for line in (f"not binary: {ids[4]}.png (a colour mask with 3 colours", f"missing: {ids[5]}.png",
                 "extra (not asked this round): someone_else.png", f"not binary: {ids[1]}.png",
                 f"another aspect ratio: {ids[2]}.png", f"unreadable: {ids[3]}.png (unreadable image file"):
        assert line in msg, line
    assert f"{ids[0]}.png" not in msg.replace(f"{ids[0]}.png'", "")
    assert sorted(os.listdir(run)) == before and not os.path.isfile(os.path.join(run, "rounds.csv"))
    assert open(os.path.join(run, "config.json")).read() == config
    os.remove(os.path.join(lab, f"{ids[3]}.png"))  # a link whose target went: named so, as the loader names it
    os.symlink(os.path.join(tmp_path, "gone.png"), os.path.join(lab, f"{ids[3]}.png"))
    out = run_script("example_tta.py", "--resume", run, check=False)
    assert out.returncode == 2 and f"broken symbolic link: {ids[3]}.png (its target {tmp_path}/gone.png is " \
        "missing)" in out.stderr, out.stderr
    # a resume before any label was drawn: says where the labels go
    shutil.rmtree(lab)
    out = run_script("example_tta.py", "--resume", run, check=False)
    assert out.returncode == 2 and "labels/round_0: folder not found" in out.stderr
    assert f"resume: {run} round 0 runs, with the labels to_label/round_0 asked for" in out.stdout  # the usual step


def test_images_without_masks_are_the_pool_and_masked_ones_the_test_set(folder, tmp_path):
    """--data folder with images/ only (and masks/ for a test set): accepted with --oracle folder, refused
    without; the pool is the unmasked images, round 0 asks for the initial set, and without any mask the
    Dice is nan (not measured), never a number made from empty masks. The error names the masks folder as it is spelt
    (Masks/ here)."""
    mine = tmp_path / "mine"
    shutil.copytree(os.path.join(folder, "images"), mine / "images")
    (mine / "Masks").mkdir()
    test_ids = sorted(os.listdir(mine / "images"))[:12]
    for name in test_ids:  # a test set of 12 masked images
        shutil.copy(os.path.join(folder, "masks", name.replace(".png", "_mask.png")), mine / "Masks")
    flags = [*TINY, "--data", "folder", "--data-dir", mine, "--split", 48, 0, 12]
    out = run_script("example_tta.py", *flags, "--out", tmp_path / "sim", check=False)
    assert out.returncode == 2 and "48 image(s) have no mask" in out.stderr and "--oracle folder" in out.stderr
    assert f"{mine}/images/" in out.stderr and f"no mask for this image in {mine}/Masks " in out.stderr
    for masks, expect_nan in ((True, False), (False, True)):
        if not masks:
            shutil.rmtree(mine / "Masks")
        runs = tmp_path / f"runs_{masks}"
        with pytest.raises(SystemExit):
            example_tta.main([*map(str, flags), "--out", str(runs), "--oracle", "folder"])
        run = str(next(runs.iterdir()))
        splits = json.load(open(os.path.join(run, "splits.json")))
        assert len(splits["train"]) == (48 if masks else 60) and len(splits["test"]) == (12 if masks else 0)
        assert not set(splits["train"]) & {n[:-4] for n in test_ids} or not masks
        with warnings.catch_warnings(record=True) as caught:  # nan without numpy's empty-mean warnings
            warnings.simplefilter("always")
            for rnd in range(3):
                annotate(run, folder)
                try:
                    example_tta.main(["--resume", run])
                except SystemExit as e:
                    assert e.code == 0 and rnd < 2
        assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        rows = list(csv.DictReader(open(os.path.join(run, "rounds.csv"))))
        assert [int(r["labeled"]) for r in rows] == [6, 10, 14]
        assert all((r["dice_mean"] == "nan") == expect_nan for r in rows), rows


@pytest.mark.parametrize("script,table,column,figure", [
    ("ceal_mcdropout", "pool_scores.csv", "dice", "figures/uncertainty_vs_dice_round_1.png"),   # Fig. 5
    ("dsal_fingerbones", "pool_scores.csv", "r_dsc", "fig3_scatter.png"),                       # Fig. 3
    ("polyp_weighted_cluster", "rounds.csv", "pool_fg_true", None)])
def test_diagnostics_against_the_pools_masks_are_nan_when_it_has_none(script, table, column, figure, folder, tmp_path):
    """Images without masks, the person's to label: the diagnostics that compare the model with the pool's hidden
    masks (common.pool_truth; they never select) are nan and their figures are not drawn, rather than numbers made
    from empty masks. (With the masks on disk the same columns are numbers: the annotator test above.)"""
    mine = tmp_path / "mine"
    shutil.copytree(os.path.join(folder, "images"), mine / "images")
    main = importlib.import_module(script).main
    flags = [*map(str, TINY + METHOD.get(script, [])), "--rounds", "1", "--data", "folder", "--data-dir", str(mine),
             "--out", str(tmp_path / "runs"), "--oracle", "folder"]
    with pytest.raises(SystemExit):
        main(flags)
    run = str(next((tmp_path / "runs").iterdir()))
    with warnings.catch_warnings(record=True) as caught:  # no test set either: nan Dice, no numpy warnings
        warnings.simplefilter("always")
        for _ in range(3):
            annotate(run, folder)
            try:
                assert main(["--resume", run]) == run
                break
            except SystemExit as e:
                assert e.code == 0
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    values = [r[column] for r in csv.DictReader(open(os.path.join(run, table)))]
    assert values and all(v == "nan" for v in values), (column, values[:5])
    assert figure is None or not os.path.exists(os.path.join(run, figure))


def test_outline_is_the_edge_of_the_prediction_not_of_the_image():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True  # a 6 x 6 square: its 1-pixel edge is 20 pixels, its 2-pixel edge all but the 2 x 2 centre
    assert oracle.outline(mask, 1).sum() == 20 and not oracle.outline(mask, 1)[3:7, 3:7].any()
    assert oracle.outline(mask, 2).sum() == 32 and oracle.outline(mask, 2)[3, 3] and not oracle.outline(mask, 2)[4, 4]
    mask[:, :5] = True  # where it meets the image's border, the border is its edge: a prediction of all is drawn
    assert oracle.outline(mask, 1)[:, 0].all() and oracle.outline(mask, 1)[0, 4] and not oracle.outline(mask, 1)[5, 1]
    assert oracle.outline(np.ones((4, 4), bool), 1).sum() == 12


def test_label_files_as_drawing_tools_save_them(tmp_path):
    """read_labels takes what the loader takes: a soft (antialiased) edge thresholded at 128, 0/1, 16-bit, a
    drawing on a transparent layer (transparent = background); hidden files are not 'extra'; a JPEG where a
    PNG was asked is named as such."""
    data = common.make_synthetic(6, 32)
    ids, lab = data.ids, tmp_path / "labels"
    lab.mkdir()
    disc = np.hypot(*np.mgrid[-16:16, -16:16]) < 9
    soft = np.clip((9.5 - np.hypot(*np.mgrid[-16:16, -16:16])) * 255, 0, 255).astype(np.uint8)  # grey rim
    assert 0 < ((soft > 0) & (soft < 255)).sum() and ((soft > 127) == disc).all()
    Image.fromarray(soft).save(lab / f"{ids[0]}.png")
    Image.fromarray(disc.astype(np.uint8)).save(lab / f"{ids[1]}.png")
    Image.fromarray(disc.astype(np.uint16) * 65535).save(lab / f"{ids[2]}.png")
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[..., :3] = 255  # white everywhere, the object opaque, the rest transparent
    layer[..., 3] = disc * 255
    Image.fromarray(layer).save(lab / f"{ids[3]}.png")
    Image.fromarray(disc.astype(np.uint8) * 255).convert("RGB").save(lab / f"{ids[4]}.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(lab / f"{ids[5]}.png")
    (lab / ".DS_Store").write_bytes(b"\0")
    (lab / "Thumbs.db").write_bytes(b"\0")
    masks = oracle.read_labels(str(lab), ids, data, 32)
    assert [bool((m == disc).all()) for m in masks] == [True] * 6
    os.rename(lab / f"{ids[5]}.png", lab / f"{ids[5]}.jpg")
    os.rename(lab / f"{ids[4]}.png", lab / f"{ids[4]}.PNG")
    with pytest.raises(common.UserError) as e:
        oracle.read_labels(str(lab), ids, data, 32)
    # each file once: named in its missing line's hint, not again as an extra
    assert "2 problem(s)" in str(e.value).splitlines()[0]
    assert str(e.value).splitlines()[1:] == [f"  missing: {ids[4]}.png (found {ids[4]}.PNG: rename it {ids[4]}.png)",
                                             f"  missing: {ids[5]}.png (found {ids[5]}.jpg: save it as PNG)"]


def test_a_deleted_to_label_round_or_changed_data_stop_the_resume(tmp_path):
    """The labels of the finished rounds are read back by the manifests' ids (oracle.restore), and the sets by
    index: a deleted to_label/round_K or an image added to the data would make a run train on empty masks or
    on other images than the person's. Both stop with a message instead."""
    data = common.write_folder(common.make_synthetic(60, 32, 3, seed=0), str(tmp_path / "data"))
    pattern = np.ones((32, 32), np.uint8)
    flags = [*map(str, TINY), "--rounds", "2", "--data", "folder", "--data-dir", data, "--out", str(tmp_path / "runs"),
             "--oracle", "folder"]
    with pytest.raises(SystemExit):
        example_tta.main(flags)
    run = str(next((tmp_path / "runs").iterdir()))
    draw(run, 0, pattern)
    with pytest.raises(SystemExit):
        example_tta.main(["--resume", run])  # round 1 asks
    draw(run, 1, pattern)
    os.rename(os.path.join(run, "to_label", "round_0"), os.path.join(run, "round_0.moved"))
    with pytest.raises(common.UserError, match=r"to_label/round_0/manifest.csv: not found, but round 0 asked for labels"):
        example_tta.main(["--resume", run])
    os.rename(os.path.join(run, "round_0.moved"), os.path.join(run, "to_label", "round_0"))
    shutil.copy(os.path.join(data, "images", "syn00000.png"), os.path.join(data, "images", "a_new_one.png"))
    shutil.copy(os.path.join(data, "masks", "syn00000_mask.png"), os.path.join(data, "masks", "a_new_one_mask.png"))
    with pytest.raises(common.UserError, match=r"splits.json: the split made from .* now differs from the run's "
                                                r"\(0 of its samples gone from the data, 61 samples there now\)"):
        example_tta.main(["--resume", run])
    for sub, name in (("images", "a_new_one.png"), ("masks", "a_new_one_mask.png")):
        os.remove(os.path.join(data, sub, name))
    with pytest.raises(SystemExit):  # as it was: round 1 trains, round 2 asks
        example_tta.main(["--resume", run])
    assert os.path.isdir(os.path.join(run, "to_label", "round_2"))


def test_a_deleted_labels_round_says_whether_the_run_would_train_on_it(tmp_path):
    """labels/round_0 gone: a run with rounds to go stops, as it would train on them again; a finished run
    stops too, but its message said it "trains on again from here", and a resume of it trains nothing."""
    data = common.write_folder(common.make_synthetic(60, 32, 3, seed=0), str(tmp_path / "data"))
    pattern = np.ones((32, 32), np.uint8)
    flags = [*map(str, TINY), "--rounds", "1", "--epochs-initial", "1", "--epochs", "1", "--data", "folder",
             "--data-dir", data, "--out", str(tmp_path / "runs"), "--oracle", "folder"]
    with pytest.raises(SystemExit):
        example_tta.main(flags)
    run = str(next((tmp_path / "runs").iterdir()))
    labels = os.path.join(run, "labels", "round_0")
    draw(run, 0, pattern)
    with pytest.raises(SystemExit):
        example_tta.main(["--resume", run])  # round 0 trains, round 1 asks
    draw(run, 1, pattern)
    os.rename(labels, labels + ".moved")
    with pytest.raises(common.UserError, match=r"label files of round 0, which the run trained on and trains on "
                                               r"again from here$"):
        example_tta.main(["--resume", run])
    os.rename(labels + ".moved", labels)
    example_tta.main(["--resume", run])  # round 1 trains: the run is done
    summary = open(os.path.join(run, "summary.json")).read()
    shutil.rmtree(labels)
    with pytest.raises(common.UserError) as e:
        example_tta.main(["--resume", run])
    assert str(e.value) == (f"{labels}: folder not found; expected the 6 label files of round 0, which the run "
                            f"trained on; it has finished (summary.json): a --resume trains nothing, it writes "
                            f"predicted/ and summary.json again from the final model; put the folder back first")
    assert open(os.path.join(run, "summary.json")).read() == summary


def test_labels_saved_in_the_wrong_place_are_named(tmp_path):
    """The walk-through of 2026-11-28: masks saved over to_label's images (the same names) got only "labels/round_0:
    folder not found"; a label file gone from a finished round read as this round's problem; the answers saved
    into the data folder's masks/ said the split "differs", not why."""
    data = common.write_folder(common.make_synthetic(40, 32, 3, seed=0), str(tmp_path / "data"))
    for name in sorted(os.listdir(os.path.join(data, "masks")))[:30]:  # 30 images to label, 10 with masks
        os.remove(os.path.join(data, "masks", name))
    flags = [*map(str, TINY), "--epochs-initial", "1", "--epochs", "1", "--data", "folder", "--data-dir", data,
             "--out", str(tmp_path / "runs"), "--oracle", "folder"]
    with pytest.raises(SystemExit):
        example_tta.main(flags)
    run = str(next((tmp_path / "runs").iterdir()))
    asked = os.path.join(run, "to_label", "round_0")
    ids = [r["sample_id"] for r in csv.DictReader(open(os.path.join(asked, "manifest.csv")))]
    pattern = np.zeros((32, 32), np.uint8)
    pattern[8:20, 8:20] = 1
    for sid in ids:  # saved where the images to label are
        Image.fromarray(pattern * 255).save(os.path.join(asked, f"{sid}.png"))
    with pytest.raises(common.UserError, match=rf"labels/round_0: folder not found; .*; {ids[0]}.png, {ids[1]}.png, "
                                               rf"{ids[2]}.png, \.\.\. in .*to_label/round_0 look like masks saved "
                                               r"over the images to label: label files go in the labels folder"):
        example_tta.main(["--resume", run])
    for sid in ids:
        shutil.copy(os.path.join(data, "images", f"{sid}.png"), asked)
    with pytest.raises(common.UserError, match=r"labels/round_0: folder not found; expected the 6 label files "
                                               r"that \S+ asks for$"):  # the images put back: no hint
        example_tta.main(["--resume", run])
    draw(run, 0, pattern)
    with pytest.raises(SystemExit):
        example_tta.main(["--resume", run])  # round 0 trains, round 1 asks
    gone = os.path.join(run, "labels", "round_0", f"{ids[0]}.png")
    os.rename(gone, gone + ".moved")
    with pytest.raises(common.UserError) as e:
        example_tta.main(["--resume", run])
    assert str(e.value).splitlines()[1:] == [f"  missing: {ids[0]}.png", f"  extra (not asked this round): {ids[0]}.png.moved",
                                             "Round 0 has finished, and the run trained on these files as they were: "
                                             "put them back as they were"]
    os.rename(gone + ".moved", gone)
    later = draw(run, 1, pattern)
    for sid in later:  # the answers saved into the data folder as masks, too
        shutil.copy(os.path.join(run, "labels", "round_1", f"{sid}.png"), os.path.join(data, "masks", f"{sid}_mask.png"))
    with pytest.raises(common.UserError, match=rf"masks: 4 image\(s\) of the run's pool now have a mask there "
                                               rf"\({sorted(later)[0]}, "):
        example_tta.main(["--resume", run])
    for sid in later:
        os.remove(os.path.join(data, "masks", f"{sid}_mask.png"))
    with pytest.raises(SystemExit):  # as it was: round 1 trains, round 2 asks
        example_tta.main(["--resume", run])
    assert os.path.isdir(os.path.join(run, "to_label", "round_2"))


class _Constant(torch.nn.Module):
    """A model that has learnt nothing: the same logit at every pixel."""

    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, xb):
        if self.logit is None:  # one that has: brighter than the image's mean is the object
            return 10 * (xb[:, :1] - xb[:, :1].mean((2, 3), keepdim=True))
        return torch.full((len(xb), 1, *xb.shape[-2:]), float(self.logit))


@pytest.mark.parametrize("logit, said", [(5.0, "the object on every pixel"), (-5.0, "no object"), (None, None)])
def test_a_model_that_predicts_every_pixel_or_none_is_named_to_the_annotator(tmp_path, capsys, logit, said):
    """The walk-through of 2026-11-28: with a model that had learnt nothing, _model.png outlined the image's edge
    and nothing said why. A model whose masks differ between images says nothing."""
    data = common.make_synthetic(4, 32)
    run = common.Run.__new__(common.Run)  # only what write_queries reads: the folder, the script and the rounds
    run.dir, run.script = str(tmp_path), "example_tta"
    run.args = type("Args", (), {"strategy": "tta", "rounds": 2})()
    x = torch.as_tensor(data.x)
    model = _Constant(logit)
    oracle.write_queries(run, 1, np.arange(4), data, model, x, 2, torch.device("cpu"), False, None)
    out = capsys.readouterr().out
    if said:
        assert out == (f"note: the model predicts {said} of the 4 images this round asks for: it has not learnt yet, "
                       f"and its outlines in _model.png show nothing (more labels or epochs help; the labels you draw "
                       f"are what counts)\n")
    else:
        assert "note" not in out
    assert len(os.listdir(tmp_path / "to_label" / "round_1")) == 4 * 2 + 2  # images, model panels, manifest, README
