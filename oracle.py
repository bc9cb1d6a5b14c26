"""The oracle: the dataset's masks (--oracle simulated, the default), or a person who answers through files
(--oracle folder). Every script calls ask() once per round, with the samples its rule sends to the oracle.
"""
import csv
import os
import shlex
import sys

import numpy as np
import torch
from PIL import Image

from common import binary_entropy, predict, predict_batches, read_rows
from loaders import IMAGE_EXT, INVERTED_WARN, UserError, _mask_stem, binarise_mask, border_share, read_image, resize_mask


LABEL_README = """Round {rnd} of {script}: label {n} image(s).

For every row of manifest.csv, draw the mask of image <sample_id>.png (here, at the original file's size):
white (255, or 1) on the {what}, black (0)
elsewhere (a transparent background counts as black), best at the image's own size (any size with its aspect
ratio is accepted, but a smaller mask is a coarser label than the dataset's own): it is resized and
thresholded at 128 as the loader does, so a soft (antialiased) edge is fine, greys elsewhere are not. Save it
as a PNG:

    {labels}/<sample_id>.png

one file per row, nothing else in that folder (.DS_Store, Thumbs.db and other hidden files are
skipped).{model}{decide}

Then go on with:

    python {script}.py --resume {run_dir}

Every file is checked first (missing, extra, unreadable, not binary, another aspect ratio); a problem stops
the run with one message listing all of them, and nothing is changed.

{after}
the run ends, and writes the final model's masks of the images you did not label to:

    {predicted}/
"""


def ask(run, rnd, idx, data, y, model=None, x=None, batch_size=16, device=None, amp=False, decide=None):
    """The oracle labels the samples idx (indices into data) of round rnd. --oracle simulated: the dataset's
    masks, already in y: nothing to do. --oracle folder: a person answers. The first time a round asks,
    the run writes RUN_DIR/to_label/round_<rnd>/ (each image at its original size, from round 1 on the
    model's prediction and uncertainty beside it, manifest.csv, README.txt) and stops with exit 0; its last
    finished round is checkpointed, so `--resume RUN_DIR` repeats this round's selection (seeded: the same
    picks, checked against the manifest) and comes back here. Then labels/round_<rnd>/<id>.png are read (read_labels),
    resized and binarised as the loader does, and written into y[idx]: the round trains on them exactly as
    on simulated labels, and pseudo-labels or model-labelled pixels stay the model's. decide: (n, S, S)
    bool, the pixels the person must decide (region_uncertainty --partial); the rest comes from the model."""
    if getattr(run.args, "oracle", "simulated") != "folder" or len(idx) == 0:
        return
    idx = np.asarray(idx)
    ids = [data.ids[i] for i in idx]
    ask_dir, lab_dir = run.path(f"to_label/round_{rnd}"), run.path(f"labels/round_{rnd}")
    manifest = os.path.join(ask_dir, "manifest.csv")
    if os.path.isfile(manifest):
        asked = [r["sample_id"] for r in read_rows(manifest)]
        if asked != ids:
            raise UserError(f"{manifest} asks for other samples than this run picks now: the selection did not "
                            f"repeat (another device than the run's?); resume where it started")
        if not os.path.isdir(lab_dir):
            raise UserError(f"{lab_dir}: folder not found; expected the {len(ids)} label files that "
                            f"{os.path.join(ask_dir, 'README.txt')} asks for" + _saved_over(ask_dir, ids))
        masks = read_labels(lab_dir, ids, data, y.shape[-1])
        y[torch.as_tensor(idx, device=y.device)] = torch.as_tensor(masks, device=y.device)
        print(f"oracle: round {rnd}: {len(ids)} labels read from {lab_dir}")
        return
    write_queries(run, rnd, idx, data, model, x, batch_size, device, amp, decide)
    print(f"stopped: round {rnd} asks for {len(ids)} labels; follow {os.path.join(ask_dir, 'README.txt')}, then "
          f"go on with: python {run.script}.py --resume {shlex.quote(run.dir)}")
    run.release_lock()
    sys.exit(0)


def restore(run, start, data, y):
    """--resume with --oracle folder: the labels the person drew in the finished rounds (labels/round_<k>,
    k < start) back into y, as ask() wrote them then. y was just read from the dataset again, whose masks are
    not the person's (empty where an image has none): without this, every resume would train the earlier
    rounds' samples on those. Checked as in ask(): a label file changed since into a bad one stops the run."""
    if getattr(run.args, "oracle", "simulated") != "folder":
        return
    where = {sid: i for i, sid in enumerate(data.ids)}
    for rnd in range(start):
        manifest = run.path(f"to_label/round_{rnd}/manifest.csv")
        if not os.path.isfile(manifest):  # a round that asked for nothing (ask() with no samples), or a deleted one
            queried = run.path("queried.csv")
            rows = read_rows(queried) if os.path.isfile(queried) else []
            if any(int(r["round"]) == rnd and r["how"] != "pseudo" for r in rows):
                raise UserError(f"{manifest}: not found, but round {rnd} asked for labels (queried.csv); put "
                                f"{os.path.dirname(manifest)} back: it says which label files the run trained on")
            continue
        ids, lab_dir = [r["sample_id"] for r in read_rows(manifest)], run.path(f"labels/round_{rnd}")
        if not os.path.isdir(lab_dir):  # a finished run (summary.json) trains no more: a resume only ends it again
            raise UserError(f"{lab_dir}: folder not found; expected the {len(ids)} label files of round {rnd}, which "
                            f"the run trained on" + ("; it has finished (summary.json): a --resume trains nothing, it "
                            "writes predicted/ and summary.json again from the final model; put the folder back first"
                            if os.path.isfile(run.path("summary.json")) else " and trains on again from here"))
        try:
            masks = read_labels(lab_dir, ids, data, y.shape[-1])
        except UserError as e:  # not this round's files: those of a round the run has trained on
            raise UserError(f"{e}\nRound {rnd} has finished, and the run trained on these files as they were: put "
                            f"them back as they were") from None
        y[torch.as_tensor([where[s] for s in ids], device=y.device)] = torch.as_tensor(masks, device=y.device)


PREDICTED_README = """{script}: the final model's masks of the {n} training image(s) you did not label.

<sample_id>.png: white on the predicted object, black elsewhere, at the image file's own size (the model
predicts at --image-size {size}; its probabilities are resized bilinearly and thresholded at 0.5). The
masks you drew are in {labels}/round_<K>/.

These are the model's guesses, checked by no one. manifest.csv lists them most uncertain first
(uncertainty: the mean binary entropy of the prediction over the image, in bits, 0 to 1; foreground: the
predicted object's share of the image): review those first. The test Dice of this model is in
rounds.csv's last row (nan where the data has no test masks).
"""


def predict_rest(run, model, data, x, idx, batch_size, device, amp=False):
    """--oracle folder, at the end of the run: the final model's mask of each training image the person did not
    label (idx: indices into data), RUN_DIR/predicted/<id>.png at the image file's own size, so that every
    image of the pool has a mask; manifest.csv (most uncertain first) and README.txt beside them."""
    if getattr(run.args, "oracle", "simulated") != "folder" or len(idx) == 0:
        return
    out, rows = run.path("predicted"), []
    os.makedirs(out, exist_ok=True)
    for b, probs in predict_batches(model, x, np.asarray(idx), batch_size, device, amp):
        for i, p in zip(b.tolist(), probs.cpu().numpy()):
            big = np.array(Image.fromarray(p).resize(file_size(data, i), Image.BILINEAR)) > 0.5
            Image.fromarray(big.astype(np.uint8) * 255).save(os.path.join(out, f"{data.ids[i]}.png"))
            rows.append({"sample_id": data.ids[i], "mask": f"{data.ids[i]}.png",
                         "original_file": data.files[i] if data.files is not None else "(in memory)",
                         "uncertainty": float(binary_entropy(torch.from_numpy(p)).mean()), "foreground": big.mean()})
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({**r, "uncertainty": f"{r['uncertainty']:.4f}", "foreground": f"{r['foreground']:.4f}"}
                    for r in sorted(rows, key=lambda r: -r["uncertainty"]))
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(PREDICTED_README.format(script=run.script, n=len(rows), size=x.shape[-1],
                                        labels=os.path.abspath(run.path("labels"))))
    print(f"predicted: the masks of the {len(rows)} image(s) you did not label, in {out} (README.txt there)")


def file_size(data, i):
    """(width, height) of sample i's image file, from its header (the in-memory size for synthetic data)."""
    if data.files is None:
        return data.x.shape[-1], data.x.shape[-2]
    try:
        with Image.open(data.files[i]) as im:
            return im.size
    except Exception:  # a TIFF Pillow cannot open (loaders.read_raw_tiff)
        return read_image(data.files[i], "L").size


def outline(mask, width):
    """The pixels of `mask` within `width` pixels of its edge (4-neighbour erosion, `width` times; where it meets
    the image's border, the border is its edge), so the prediction is drawn over the image without hiding it."""
    inner = mask
    for _ in range(width):
        q = np.pad(inner, 1)
        inner = q[1:-1, 1:-1] & q[:-2, 1:-1] & q[2:, 1:-1] & q[1:-1, :-2] & q[1:-1, 2:]
    return mask & ~inner


def write_queries(run, rnd, idx, data, model, x, batch_size, device, amp, decide):
    """RUN_DIR/to_label/round_<rnd>/: <id>.png (the image as found, or the in-memory one), <id>_model.png
    (prediction and uncertainty), <id>_decide.png (with decide), manifest.csv and README.txt."""
    ask_dir = run.path(f"to_label/round_{rnd}")
    os.makedirs(ask_dir, exist_ok=True)
    trained = model is not None and rnd > 0  # round 0 asks before any training: no prediction worth showing
    probs = predict(model, x, idx, batch_size, device or x.device, amp).float().cpu().numpy() if trained else None
    if probs is not None and len(probs) > 1 and ((probs > 0.5).all() or not (probs > 0.5).any()):
        print(f"note: the model predicts {'the object on every pixel' if (probs > 0.5).all() else 'no object'} of "
              f"the {len(probs)} images this round asks for: it has not learnt yet, and its outlines in _model.png "
              f"show nothing (more labels or epochs help; the labels you draw are what counts)")
    rows = []
    for k, i in enumerate(idx):
        sid = data.ids[i]
        if data.files is not None:
            image = read_image(data.files[i], "RGB")
        else:
            image = Image.fromarray(data.x[i][0] if data.x.shape[1] == 1 else data.x[i].transpose(1, 2, 0)).convert("RGB")
        image.save(os.path.join(ask_dir, f"{sid}.png"))
        row = {"sample_id": sid, "original_file": data.files[i] if data.files is not None else "(in memory)",
               "image": f"{sid}.png", "model": "", "decide": "",
               "asked": "the whole mask", "label_file": f"labels/round_{rnd}/{sid}.png"}
        if probs is not None:  # at the image's aspect ratio, its long side 512 px
            f = 512 / max(image.size)
            size = (max(1, round(image.size[0] * f)), max(1, round(image.size[1] * f)))
            small = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32)
            p = np.array(Image.fromarray(probs[k]).resize(size, Image.BILINEAR))[..., None]
            pred = small  # the image untouched, the predicted object's edge drawn on it in yellow
            pred[outline(p[..., 0] > 0.5, 2)] = (255, 255, 0)  # 2 px wide at 512 px
            unc = np.repeat(255 * binary_entropy(torch.from_numpy(p)).numpy(), 3, 2)
            Image.fromarray(np.concatenate([pred, unc], 1).clip(0, 255).astype(np.uint8)).save(
                os.path.join(ask_dir, f"{sid}_model.png"))
            row["model"] = f"{sid}_model.png"
        if decide is not None:
            Image.fromarray(np.asarray(decide[k], np.uint8) * 255).resize(image.size, Image.NEAREST).save(
                os.path.join(ask_dir, f"{sid}_decide.png"))
            row.update(decide=f"{sid}_decide.png",
                       asked="the pixels white in the decide map; the model's prediction is kept elsewhere")
        rows.append(row)
    with open(os.path.join(ask_dir, "manifest.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    decide_text = ("\n\nThis round labels only part of each image: <sample_id>_decide.png marks (white) the pixels\n"
                   "you decide; draw the whole mask all the same, and the run keeps the model's own labels\n"
                   "outside the white pixels.") if decide is not None else ""
    model_text = ("\n\n<sample_id>_model.png shows what the model predicts (outlined in yellow, left)\n"
                  "and how unsure it is (bright = unsure, right), to help you; it is not a label.") \
        if probs is not None else "\n\nRound 0 asks before any training: no model prediction is shown."
    last = 0 if run.args.strategy == "full" else run.args.rounds  # the ceiling asks for its whole pool at once
    after = ("This is the last round: after it" if rnd >= last else
             f"Round {last} asks again (unless the pool runs out); then" if rnd + 1 == last else
             f"Rounds {rnd + 1} to {last} ask again (fewer if the pool runs out); then")
    with open(os.path.join(ask_dir, "README.txt"), "w") as f:
        f.write(LABEL_README.format(rnd=rnd, script=run.script, n=len(rows),
                                    run_dir=shlex.quote(os.path.abspath(run.dir)),  # a path with spaces pastes whole
                                    decide=decide_text, model=model_text, after=after,
                                    predicted=os.path.abspath(run.path("predicted")),
                                    what="object to segment (lesion, polyp, bone, tumour)",
                                    labels=os.path.abspath(run.path(f"labels/round_{rnd}"))))


def _meant(name):
    """The image stems a label file's name may have been meant to give, in lower case: its stem (spaces at its
    ends and repeated image extensions dropped), and that less a mask suffix (a_mask.png)."""
    s = name.strip()
    while os.path.splitext(s)[1].lower() in IMAGE_EXT and os.path.splitext(s)[0].strip():
        s = os.path.splitext(s)[0].strip()
    return {s.lower(), _mask_stem(s + ".png").lower()}


def _saved_over(ask_dir, ids):
    """A hint, when the label files were saved over the images to label (they share their names): ''
    unless some <id>.png in to_label/round_K is a black and white mask."""
    over = []
    for sid in ids:
        try:
            with Image.open(os.path.join(ask_dir, f"{sid}.png")) as im:
                if len(np.unique(np.asarray(im.convert("L")))) <= 2:
                    over.append(f"{sid}.png")
        except (OSError, ValueError):
            continue
    return (f"; {', '.join(over[:3])}{', ...' if len(over) > 3 else ''} in {ask_dir} look like masks saved over "
            f"the images to label: label files go in the labels folder above, under the same names") if over else ""


def read_labels(lab_dir, ids, data, size):
    """The person's label files for ids, checked all at once: missing, extra (hidden files aside), unreadable,
    not binary (loaders.binarise_mask), another aspect ratio than the image (2 % tolerance). Any problem: one UserError
    listing all of them (nothing is changed). Labels that look inverted get one warning line naming them
    (the loader's rule, loaders.check_inverted, file by file). Returns (n, size, size) uint8 in {0, 1}."""
    want = {f"{sid}.png": sid for sid in ids}
    present = sorted(n for n in os.listdir(lab_dir) if not n.startswith(".") and n not in ("Thumbs.db", "desktop.ini"))
    # a file whose name is the asked one but for the letter case, the extension, spaces around it, an extension
    # twice (a.png.png, Windows hiding the first) or the masks/ folder's suffix (a_mask.png): named in the hint
    stems = {k: n for n in present if n not in want for k in _meant(n)}
    show = lambda n: repr(n) if n != n.strip() else n  # quoted where a space at an end would not show
    found = lambda n, name: (f" (found {show(n)}: rename it {name})" if n.strip().lower().endswith(".png") else
                             f" (found {show(n)}: save it as PNG)")
    missing = [name for name in want if name not in present]
    hint = {name: stems.get(name[:-4].lower()) for name in missing}
    problems = [f"missing: {name}" + (found(hint[name], name) if hint[name] else "") for name in missing]
    hinted = set(hint.values())  # named once, in its missing line
    problems += [f"extra (not asked this round): {show(name)}" for name in present
                 if name not in want and name not in hinted]
    masks, where = {}, {sid: k for k, sid in enumerate(data.ids)}
    for name in present:
        if name not in want:
            continue
        path = os.path.join(lab_dir, name)
        if os.path.islink(path) and not os.path.exists(path):  # as the loader says it of a data folder's file
            problems.append(f"broken symbolic link: {name} (its target {os.path.realpath(path)} is missing)")
            continue
        try:
            m = np.asarray(read_image(path, "L", mask=True))
        except UserError as e:  # a file Pillow cannot read, or a colour mask that is not one colour on black
            why = str(e)[len(path) + 2:] if str(e).startswith(path + ": ") else str(e)
            problems.append(f"{'unreadable' if why.startswith('unreadable') else 'not binary'}: {name} ({why})")
            continue
        try:
            m = binarise_mask(m, path)  # the loader's rule: 0/1, or 0/255 thresholded at 128 (soft edges)
        except UserError as e:
            problems.append(f"not binary: {name} ({str(e)[len(path) + 2:]})")
            continue
        w, h = file_size(data, where[want[name]])
        if abs(m.shape[1] / m.shape[0] - w / h) > 0.02 * w / h:
            problems.append(f"another aspect ratio: {name} is {m.shape[1]}x{m.shape[0]}, its image {w}x{h}")
            continue
        masks[want[name]] = resize_mask(m, size)
    if problems:
        raise UserError(f"{lab_dir}: {len(problems)} problem(s) with the label files; nothing was changed:\n  "
                        + "\n  ".join(problems))
    labels = np.stack([masks[sid] for sid in ids])
    inverted = [f"{sid}.png" for sid, m in zip(ids, labels) if border_share(m[None]) > INVERTED_WARN]
    if inverted:  # the loader's rule (loaders.check_inverted), file by file: one inverted file among right ones
        print(f"warning: {len(inverted)} label(s) in {lab_dir} are foreground on more than {INVERTED_WARN:.0%} of "
              f"their border pixels ({', '.join(inverted[:5])}{', ...' if len(inverted) > 5 else ''}); expected "
              f"the object white (255 or 1) on a black background: are they inverted?")
    if len(ids) > 1 and not labels.any():  # one empty label may be right (no object); all of them seldom are
        print(f"warning: all {len(ids)} labels in {lab_dir} are empty (black): the model learns background only "
              f"from them; expected the object white on black (saved from the right layer?)")
    return labels
