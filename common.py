"""Plumbing shared by the active-learning scripts, and only plumbing.

Flags and per-dataset defaults, splits and labelling budgets, Dice/IoU, losses, the train loop, batched
prediction, Monte Carlo dropout sampling, the query rules that several scripts share. Beside it: runfolder.py
(the run folder: config, rounds.csv, queried ids, summary, checkpoint, run.lock, --resume; the device and the
seeds; run_main), loaders.py (the dataset layouts, the uint8 cache, the synthetic generator), plots.py (the
charts and panels), tables.py (the tables of finished runs), oracle.py (who labels the queries) and unet.py
(the models). It never imports a script.
"""
import argparse
import math
import os
import sys
import time
import warnings
import zlib

import numpy as np
import PIL
import torch
import torch.nn as nn
import torch.nn.functional as F

# Data (loaders.py), figures (plots.py), the run folder (runfolder.py) live in their own files; the scripts
# reach them through common
from loaders import (Data, UserError, default_split, load_data, make_splits, make_synthetic, subfolder,  # noqa: F401
                     write_folder)
from plots import COLOURS, learning_curve, picks_sheet, plot, plot_hist, save_panel  # noqa: F401
from tables import (collect_runs, markdown_table, one_schedule, out_folder, read_config, read_json,  # noqa: F401
                    read_rows, summarise)
from progress import Progress, fmt_s  # noqa: F401
from runfolder import ROUND_COLUMNS, Run, get_device, run_main, seed_everything  # noqa: F401


# ---- Flags shared by every script, in the agreed order, and per-dataset defaults ---------------------------
DATASETS = ["synthetic", "isic2017", "isic2018", "ph2", "cvc-clinicdb", "kvasir-seg", "lgg", "folder"]


class Parser(argparse.ArgumentParser):
    """argparse that also records the flags typed (args._typed): --resume names those it does not apply. It also
    parses a dict of flag values (a run's config.json args: Run checks them on --resume as a new run's flags)."""
    strict = False  # parsing such a dict: a value argparse refuses is a UserError (one line), not a usage message

    def parse_args(self, args=None, namespace=None):
        self.strict = isinstance(args, dict)
        args = self.argv(args) if self.strict else args
        ns = super().parse_args(args, namespace)
        dest = {o: a.dest for a in self._actions for o in a.option_strings}
        words = [str(w).split("=")[0] for w in (sys.argv[1:] if args is None else args) if str(w).startswith("--")]
        ns._typed = sorted({dest.get(w) or next((d for o, d in dest.items() if o.startswith(w)), None)
                            for w in words} - {None})  # an unambiguous prefix is a flag too, as argparse takes it
        return ns

    def error(self, message):
        if self.strict:
            raise UserError(message)
        super().error(message)

    def argv(self, values):
        """The command line that sets the flags to these values ({dest: value}); None and keys that name no flag
        are left out."""
        out = []
        for a in self._actions:
            v = values.get(a.dest)
            if v is None or not a.option_strings or a.dest == "help":
                continue
            if a.nargs == 0:  # a switch: store_true, or --x / --no-x
                if not isinstance(v, bool):
                    raise UserError(f"argument {a.option_strings[0]}: expected true or false, not {v!r}")
                if isinstance(a, argparse.BooleanOptionalAction):
                    out.append(a.option_strings[0 if v else 1])
                elif v == a.const:
                    out.append(a.option_strings[0])
            elif a.nargs is not None and isinstance(v, list):  # --split 40 8 12
                out += [a.option_strings[0], *map(str, v)]
            else:  # "--lr=-1": a value that starts with "-" is not taken for a flag
                out.append(f"{a.option_strings[0]}={v}")
        return out


def shared_parser(doc, strategies, defaults):
    """argparse with the shared flags first, in the order every script uses; `defaults` is the script's
    per-dataset table (the row "other" serves datasets the paper did not use). Flags left at None are
    filled from that table by resolve()."""
    p = Parser(usage="%(prog)s [flags]", description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
               formatter_class=argparse.RawDescriptionHelpFormatter)

    def per_data(key):
        return "default per --data: " + ", ".join(f"{d} {'from the data' if row[key] is None else row[key]}"
                                                  for d, row in defaults.items() if key in row)

    p.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset (default: synthetic)")
    p.add_argument("--data-dir", help="dataset root as downloaded (not needed for synthetic)")
    p.add_argument("--image-size", type=int, help="images are resized to this square size; " + per_data("image_size"))
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy, torch, the split and queries (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps (default: auto)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA/CPU (default: off)")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last finished round")
    p.add_argument("--strategy", default=strategies[0], choices=strategies, help=f"query rule (default: {strategies[0]})")
    p.add_argument("--oracle", default="simulated", choices=["simulated", "folder"],
                   help="who labels the queries: simulated (the dataset's masks) or folder (a person: each round "
                        "writes RUN_DIR/to_label/round_K/ and stops; label, then --resume RUN_DIR) (default: simulated)")
    p.add_argument("--initial", type=int, help="labelled samples before the first query; " + per_data("initial"))
    p.add_argument("--query", type=int, help="samples sent to the oracle per round; " + per_data("query"))
    p.add_argument("--rounds", type=int, help="active-learning rounds; " + per_data("rounds"))
    p.add_argument("--epochs-initial", type=int, help="epochs of the initial training; " + per_data("epochs_initial"))
    p.add_argument("--epochs", type=int, help="epochs per round; " + per_data("epochs"))
    p.add_argument("--batch-size", type=int, help=per_data("batch_size"))
    p.add_argument("--lr", type=float, help="learning rate; " + per_data("lr"))
    p.add_argument("--width", type=int, help="U-Net width (channels of the first stage); " + per_data("width"))
    p.add_argument("--split", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="split sizes (train pool, validation, test); " + per_data("split"))
    p.add_argument("--deterministic", action="store_true", help="deterministic cuDNN / algorithms (slower)")
    p.add_argument("--workers", type=int, default=0, help="threads for decoding images (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward (GPU; slow first "
                   "batches, then faster; default: off)")
    return p


# the smallest value of each count flag (a variance needs 2 passes); a script passes its own to resolve()
AT_LEAST = dict(seed=0, initial=1, query=1, rounds=0, epochs_initial=0, epochs=0, batch_size=1, width=1, workers=0,
                mc_passes=2, pseudo_step=0)
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_IMAGE_SIZE = 4096  # the papers use 128 to 512; 4096 px images of 1000 samples hold 50 GB


def resolve(args, defaults, size=(16, 32), **at_least):
    """Fill every flag left at None from the script's table row for --data (or its "other" row), then check
    the numbers: each count at least its AT_LEAST (or `at_least`) value, --lr above 0, every float finite and
    within float32's range, --seed below 2^32, no --data-dir for synthetic data, --split not negative, --dropout
    in [0, 1), --image-size a multiple of size[0], at least size[1] and at most MAX_IMAGE_SIZE (unet.UNet halves
    it 4 times; at 16 px its 1x1 bottleneck cannot train BatchNorm on a batch of one image; region's ResNet-18
    U-Net passes (32, 64))."""
    row = defaults.get(args.data, defaults.get("other", {}))
    vars(args).update({key: value for key, value in row.items() if getattr(args, key, None) is None})
    for key, low in {**AT_LEAST, **at_least}.items():
        value = getattr(args, key, None)
        if value is not None and value < low:
            raise UserError(f"--{key.replace('_', '-')} {value}: expected at least {low}")
    (step, low), dropout = size, getattr(args, "dropout", None) or 0
    for bad, message in ((not 0 < args.lr < math.inf, f"--lr {args.lr}: expected a finite learning rate above 0"),
                         (args.seed >= 2 ** 32, f"--seed {args.seed}: expected below 2^32 (NumPy's seed range)"),
                         (args.data == "synthetic" and args.data_dir and not args.resume, f"--data-dir {args.data_dir} "
                          "with --data synthetic, which is built in and reads no folder: name its --data (e.g. folder)"),
                         (args.split and (min(args.split) < 0 or args.split[0] < 1), f"--split {args.split}: expected "
                          "sizes of at least 0, the training pool's (the first) at least 1"),
                         (not 0 <= dropout < 1, f"--dropout {dropout}: expected a probability in [0, 1)"),
                         (args.image_size < low or args.image_size % step, f"--image-size {args.image_size}: expected "
                          f"a multiple of {step}, at least {low} (the U-Net's poolings); the nearest "
                          + (f"are {args.image_size // step * step} and {args.image_size // step * step + step}"
                             if args.image_size > low else f"is {low}")),
                         (args.image_size > MAX_IMAGE_SIZE, f"--image-size {args.image_size}: expected at most "
                          f"{MAX_IMAGE_SIZE} (every image is kept in memory at this size: a typo?)")):
        if bad:
            raise UserError(message)
    for key, value in vars(args).items():  # every float flag (or list of them) finite: a nan or inf is a typo
        floats = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, float)]
        if not all(math.isfinite(v) for v in floats):
            raise UserError(f"--{key.replace('_', '-')} {value}: expected a finite number")
        if any(abs(v) > FLOAT32_MAX for v in floats):  # torch stores an lr, a weight, in float32: it would overflow
            raise UserError(f"--{key.replace('_', '-')} {value}: expected at most {FLOAT32_MAX:.3g} in size (float32)")
    return args


def check_mc_dropout(args, *strategies):
    """The MC-dropout strategies need dropout: at --dropout 0 every pass is the same, every uncertainty 0 and the
    picks arbitrary (CEAL, SSL's comparators, region's baseline)."""
    if args.strategy in strategies and args.dropout == 0:
        raise UserError(f"--strategy {args.strategy} needs --dropout > 0 (MC dropout: with none, every pass is the "
                        f"same)")


# ---- Device and mixed precision (seeding and the device flag: runfolder.py) -------------------------------
def autocast(device, amp):
    """bf16 autocast when --amp (no GradScaler needed for bf16)."""
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=bool(amp) and device.type in ("cuda", "cpu"))


def memory_format(device):
    """channels_last (NHWC) on CUDA only, where tensor cores want it; the CPU keeps the default layout.
    On the CPU, torch 2.13.0's backward of a 1x1 stride-2 convolution in channels_last with few input channels
    corrupts the heap (docs/cpu_channels_last_crash.md; ResNet's downsample convolution at small widths hits
    it), and the speed it bought there was small (docs/speed.md)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def prepare_model(model, device, compile=False):
    """Move to the device in its memory format (channels_last on CUDA: memory_format); train, predict_batches,
    mc_dropout (and ssl_coldstart.pooled_features) feed batches in the same format. compile=True (--compile)
    compiles forward() in place (nn.Module.compile: state_dict keys, attributes and checkpoints unchanged;
    encode/decode called directly, as mc_dropout does, stay eager)."""
    model = model.to(device).to(memory_format=memory_format(device))
    if compile:
        model.compile()
    return model


def pool_share(n_pool, count, paper_pool):
    """A count of a paper's protocol (initial set, query size) carried to another dataset as the same share
    of the training pool, at least 1: the scripts' "other" rows use it so that the budget fits any pool."""
    return max(1, round(count * n_pool / paper_pool))


def split_data(run, data, args, initial, query, paper_pool, split=None, pseudo=None):
    """A run's seeded split and labelling counts, recorded in its folder. Flags left at None come from the
    data: --split from `split` (else default_split), --initial and --query (and --pseudo-step, given `pseudo`:
    CEAL's pseudo-labels per iteration) as the paper's `initial`, `query` (and `pseudo`) of its training pool
    of `paper_pool`, carried to this pool (pool_share). Writes splits.json and the resolved flags (config.json,
    with the sizes achieved as "split_achieved": a split by patient, lgg, is approximate and also prints
    requested vs achieved), checks the training pool's masks (check_foreground); on --resume, that the data
    still gives the run's split. Returns the train, validation and test indices."""
    recorded, old = run.path("splits.json"), None
    if args.resume and os.path.isfile(recorded):  # the data must still hold the run's samples, before any split
        try:
            old = read_json(recorded)
        except ValueError as e:
            raise UserError(f"{recorded}: unreadable ({e}); expected the run's split as it was written at its start")
        if not (isinstance(old, dict) and all(isinstance(v, list) and all(isinstance(i, str) for i in v)
                                              for v in old.values())):  # a hand edit, another file under its name
            raise UserError(f"{recorded}: not a split; expected the run's split as it was written at its start "
                            f"({{set name: [sample ids]}})")
    unlabelled = data.official.get("unlabelled")
    if unlabelled is not None and old is not None:  # a resume: the pool's images must still have no mask
        masked = set(data.ids) - {data.ids[i] for i in unlabelled}
        moved = sorted(sid for sid in old.get("train", []) if sid in masked)
        if moved:  # a person's labels saved into the data folder make those images test images
            raise UserError(f"{subfolder(args.data_dir, 'masks')}: {len(moved)} image(s) of the run's pool "
                            f"now have a mask there ({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}), so "
                            f"they would leave the pool for the test set; the labels you draw go in "
                            f"{run.path('labels')}/round_<K>/, not in the data folder: move those masks out")
    if unlabelled is not None:  # images without masks (list_folder): the person labels them, the masked ones test
        if getattr(args, "oracle", "simulated") != "folder":
            first = data.files[unlabelled[0]] if data.files else data.ids[unlabelled[0]]
            raise UserError(f"{first}: no mask for this image in {subfolder(args.data_dir, 'masks')} "
                            f"(expected masks/<stem>[_mask].<ext>); {len(unlabelled)} image(s) have no mask. To "
                            f"label them yourself: --oracle folder")
        given, args.split = args.split, [len(unlabelled), 0, len(data) - len(unlabelled)]
        other = given and list(given) != args.split  # (on --resume, given is the run's: the folder's)
        print(f"data: {len(unlabelled)} images to label (the pool), {args.split[2]} with masks (the test set); no "
              f"validation set (val_dice nan){'; --split set from the folder, not ' + str(given) if other else ''}"
              + ("" if args.split[2] else "; no test set: the Dice columns of rounds.csv stay nan (not measured)"))
        data.official["train"] = unlabelled
    elif getattr(args, "oracle", "simulated") == "folder" and not args.resume:  # nothing in the folder to label
        print("note: --oracle folder, and every image has a mask: the usual split; you label the pool's queries "
              "(their masks unused), the test set's masks score the model")
    gone = set(sum(old.values(), [])) - set(data.ids) if old is not None else set()
    changed = UserError(f"{recorded}: the split made from {args.data_dir or data.name} now differs from the run's "
                        f"({len(gone)} of its samples gone from the data, {len(data)} samples there now): the data "
                        f"changed since the run started, or this file was edited; put it back as it was, or start a "
                        f"new run")
    if gone:
        raise changed
    if args.split is None:
        args.split = split or default_split(data)
    ids = make_splits(data, args.split, args.seed)
    achieved = [len(i) for i in ids]
    if not achieved[2] and unlabelled is None:
        print(f"note: no test set (--split {' '.join(map(str, args.split))}): test Dice nan (not measured), null "
              f"in summary.json")
    if data.groups is not None:  # by patient: the sizes are approximate (make_splits)
        print(f"split by patient: requested train {args.split[0]} / val {args.split[1]} / test {args.split[2]}, "
              f"achieved {achieved[0]} / {achieved[1]} / {achieved[2]} "
              f"({' / '.join(str(len(set(data.groups[i]))) for i in ids)} patients)")
    if getattr(args, "oracle", "simulated") == "simulated":  # a person's labels come later (oracle.ask)
        check_foreground(data, ids[0], getattr(args, "data_dir", None))
    split_ids = {k: [data.ids[i] for i in v] for k, v in zip(("train", "val", "test"), ids)}
    if old is not None and old != split_ids:  # samples added: the same seed splits them otherwise
        raise changed
    # the images as decoded: other pixels under the same sample names (another dataset, edited files) are
    # another dataset, whose rounds would not continue this run's
    crc, cfg = f"{zlib.crc32(np.ascontiguousarray(data.x)):08x}", read_json(run.path("config.json"))
    if args.resume and cfg.get("images_crc32") not in (None, crc):
        pil = "" if cfg.get("pillow", PIL.__version__) == PIL.__version__ else (
            f"; or Pillow {PIL.__version__} decodes or resizes them otherwise than the run's {cfg['pillow']} did")
        raise UserError(f"{args.data_dir or data.name}: the images differ from the run's (the same sample names, "
                        f"other pixels: crc32 {crc}, the run's {cfg['images_crc32']} in its config.json): the data "
                        f"changed since the run started{pil}; put it back as it was, or start a new run")
    if args.initial is None:
        args.initial = pool_share(len(ids[0]), initial, paper_pool)
    if args.query is None:
        args.query = pool_share(len(ids[0]), query, paper_pool)
    if pseudo is not None and args.pseudo_step is None:
        args.pseudo_step = pool_share(len(ids[0]), pseudo, paper_pool)
    run.update_config(args)
    run.write_json("config.json", dict(read_json(run.path("config.json")), split_achieved=achieved,
                                       images_crc32=crc))
    run.write_json("splits.json", split_ids)
    plan = (f"all {len(ids[0])} labelled (the ceiling)" if args.strategy == "full" else
            f"{args.initial} labelled, then {args.rounds} round{'s' * (args.rounds != 1)} of +{args.query}")
    print(f"run: {run.dir} on {run.device}: pool {len(ids[0])}, validation {len(ids[1])}, test {len(ids[2])}; "
          f"{plan}", flush=True)  # the folder and the plan, before a first epoch that may take minutes
    return ids


def pool_truth(data, y):
    """The pool's masks for the diagnostics that compare the model with them and never select (CEAL's Fig. 5
    Dice, DSAL's R-DSC, the polyp script's pool_fg_true): y, or None where the pool has no masks (--data folder
    images without masks, the person's to label), so that those diagnostics are nan rather than numbers
    made from empty masks."""
    return None if "unlabelled" in data.official else y


EMPTY_WARN = 0.5  # warn when more than this share of the training pool's masks is empty (lgg --all-slices: ~65 %)


def check_foreground(data, pool, data_dir=None):
    """The training pool must hold some foreground: masks that are all empty mean another mask convention or
    the wrong folder, and the run would end at Dice 0 without a word. Full-resolution masks where known
    (Data.positive). All empty: UserError; more than EMPTY_WARN of them empty: one warning line."""
    pos = data.positive if data.positive is not None else data.y.reshape(len(data), -1).any(1)
    n, empty = len(pool), int(len(pool) - np.count_nonzero(pos[pool]))
    if n and empty == n:
        raise UserError(f"{data_dir or data.name}: all {n} masks of the training pool are empty (not one foreground "
                        f"pixel); expected binary masks with the lesion bright (0/255) or 1 (0/1) on a 0 background. "
                        f"Masks in another convention, or the wrong folder?")
    if empty > EMPTY_WARN * n:
        print(f"warning: {empty} of {n} training-pool masks ({empty / n:.0%}) are empty; expected for lgg "
              f"(most slices show no tumour), else check the masks in {data_dir or data.name} (lesion 255 or 1, background 0)")


def pool_used_up(rnd, pool):
    """True, with a line saying so, when a query round finds the unlabelled pool empty (pseudo-labels and
    a pool-sized budget can empty it before the last round): every script's round loop stops there."""
    if rnd > 0 and len(pool) == 0:
        print(f"round {rnd}: the unlabelled pool is used up; stopping")
        return True
    return False


def check_budget(n_pool, initial, query, rounds, what="--initial + --query x --rounds"):
    """The oracle's budget must fit the training pool: for --strategy full too, whose optimiser steps are those
    of the active-learning run these flags describe (ceiling), so a full run and its active-learning runs take
    the same flags."""
    need = initial + query * rounds
    if initial < 1 or need > n_pool:
        raise UserError(f"labelling budget {need} ({what} = {initial} + {query} x {rounds}) exceeds the training "
                        f"pool of {n_pool} samples; lower the budget, or give the pool more samples (the first --split "
                        f"size; with --oracle folder, more images without masks)")


# ---- Metrics and losses ------------------------------------------------------------------------------------
def dice_iou(pred, gt):
    """Per-image Dice and IoU of binary masks (B, H, W); an image where both are empty scores 1."""
    pred, gt = pred.reshape(len(pred), -1).float(), gt.reshape(len(gt), -1).float()
    inter = (pred * gt).sum(1)
    total = pred.sum(1) + gt.sum(1)
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(total), 2 * inter / total.clamp(min=1))
    iou = torch.where(empty, torch.ones_like(total), inter / (total - inter).clamp(min=1))
    return dice, iou


def soft_dice_loss(logits, target, smooth=1.0):
    """1 - soft Dice per image, averaged over the batch; logits (B, 1, H, W), target (B, H, W) in {0, 1}."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def bce_dice_loss(logits, target):
    """BCE + soft Dice. With one output logit, BCE equals two-class cross-entropy (softmax over [0, z] is the
    sigmoid of z), so this is also the papers' "CE + Dice"."""
    bce = F.binary_cross_entropy_with_logits(logits.float().squeeze(1), target.float())
    return bce + soft_dice_loss(logits, target)


def to_input(xb):
    """uint8 (B, C, H, W) on the device -> float in [0, 1]."""
    return xb.float().div_(255)


# ---- Train loop, prediction, MC dropout --------------------------------------------------------------------
def to_device(data, device):
    """The whole set on the device as uint8: images (N, C, S, S), masks (N, S, S)."""
    x = torch.from_numpy(np.ascontiguousarray(data.x)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(data.y)).to(device)
    return x, y


def train_epochs(model, opt, x, target, idx, epochs, batch_size, *, device, amp=False, loss_fn=bce_dice_loss,
                 augment=None, extra_loss=None, generator=None, steps=None, lr_flag="--lr"):
    """Train on x[idx] with target[idx] (both uint8 on the device; gathered by index each step), yielding
    (epoch, its mean loss, its seconds) after each epoch: the caller's loop body logs, validates or saves between
    epochs (no callbacks), and the training goes on when the loop asks for the next epoch.
    augment(xb, yb) -> (xb, yb) runs on device batches; extra_loss(model) -> tensor is added each step (e.g.
    a loss on unlabelled data). The running loss stays on the device: one host sync per epoch.
    steps: instead of `epochs`, exactly this many optimiser steps: whole epochs, then one partial epoch on a
    random subset of idx (drawn with generator). The ceiling of every script (--strategy full) trains so,
    for the active-learning run's step count (ceiling), not more epochs of a larger set.
    A NaN or inf epoch loss (diverged) stops the run with a UserError that names lr_flag, the flag that sets
    this training's learning rate."""
    kw = dict(device=device, amp=amp, loss_fn=loss_fn, augment=augment, extra_loss=extra_loss, generator=generator,
              lr_flag=lr_flag)
    if steps is not None:
        epochs, rest = divmod(steps, math.ceil(len(idx) / batch_size))
        yield from train_epochs(model, opt, x, target, idx, epochs, batch_size, **kw)
        if rest:
            part = np.asarray(idx)[torch.randperm(len(idx), generator=generator)[:rest * batch_size].numpy()]
            for _, loss, seconds in train_epochs(model, opt, x, target, part, 1, batch_size, **kw):
                yield epochs, loss, seconds
        return
    idx = torch.as_tensor(np.asarray(idx), device=device, dtype=torch.long)
    for epoch in range(epochs):
        t0 = shown = time.time()
        model.train()  # every epoch: a loop body that predicts (CEAL's validation) leaves the model in eval mode
        order = idx[torch.randperm(len(idx), generator=generator).to(device)]
        total = torch.zeros((), device=device)
        for s in range(0, len(order), batch_size):
            b = order[s: s + batch_size]
            xb, yb = to_input(x[b]), target[b]
            if augment is not None:
                xb, yb = augment(xb, yb)
            xb = xb.contiguous(memory_format=memory_format(device))
            with autocast(device, amp):
                loss = loss_fn(model(xb), yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(b)
            now = time.time()
            if now - shown >= 60:  # an epoch of minutes (a paper's size on a CPU) shows that it is under way
                shown = now
                print(f"    {s + len(b)}/{len(order)} images of this epoch, {fmt_s(now - t0)}", flush=True)
        loss = total.item() / max(1, len(order))
        weights = sum(p.detach().float().sum() for p in model.parameters())  # after the epoch's last step
        if not (math.isfinite(loss) and math.isfinite(weights)):  # diverged: every later score NaN, queries arbitrary
            raise UserError(f"training diverged: epoch {epoch + 1}'s mean loss is {loss}"
                            f"{'' if math.isfinite(weights) else ', its weights not finite'} (lr now "
                            f"{opt.param_groups[0]['lr']:g}{', --amp' if amp else ''}); start a new run with a lower "
                            f"{lr_flag}{' or without --amp' if amp else ''}, or a smaller loss weight if you raised one "
                            "(--resume keeps the run's flags: it would diverge again)")
        yield epoch, loss, time.time() - t0


def train(*args, **kw):
    """train_epochs run to its end, for a caller with nothing to do between epochs (an ensemble's members):
    the list of epoch mean losses."""
    return [loss for _, loss, _ in train_epochs(*args, **kw)]


def al_steps(plan, batch_size):
    """Optimiser steps of the active-learning run that `plan` (Progress.plan: round r trains n_r images for
    e_r epochs, the pool's end and pseudo-labels counted) describes."""
    return sum(e * math.ceil(n / batch_size) for n, e, _ in plan)


def ceiling(args, n_train, pseudo=None, redraw=False, steps=None):
    """The schedule: (rounds after round 0, epochs of round 0, optimiser steps of round 0 or None). For
    --strategy full, the ceiling, the same model trains on the whole pool of n_train for the optimiser steps
    of the active-learning run these flags describe (al_steps; pseudo(r), redraw: CEAL's pseudo-labels, as in
    Progress.plan), or `steps` where a paper states its own count (region's --full-steps), in round 0 alone:
    (0, its epochs, the steps). Otherwise the flags': (rounds, epochs_initial, None)."""
    if args.strategy != "full":
        return args.rounds, args.epochs_initial, None
    steps = steps or al_steps(Progress.plan(args.initial, args.query, args.rounds, args.epochs_initial, args.epochs,
                                            n_train - args.initial, pseudo=pseudo, redraw=redraw), args.batch_size)
    return 0, math.ceil(steps / math.ceil(n_train / args.batch_size)), steps


def prediction_panel(run, model, data, x, ids, batch_size, device, amp=False):
    """panel.png: image, ground truth and the model's prediction for a few samples."""
    probs = predict(model, x, ids, batch_size, device, amp).cpu().numpy()
    save_panel(run.path("panel.png"), [[data.x[i], data.y[i], p > 0.5] for i, p in zip(ids, probs)], 3,
               ["image", "ground truth", "prediction"])


def batches(idx, batch_size):
    for s in range(0, len(idx), batch_size):
        yield idx[s: s + batch_size]


@torch.inference_mode()
def predict(model, x, idx, batch_size, device, amp=False, view=None):
    """Sigmoid probabilities (N, H, W) float32 on the device for x[idx], in batches, BatchNorm and dropout
    in eval mode. (For sets too large to hold, iterate predict_batches.)"""
    return torch.cat([p for _, p in predict_batches(model, x, idx, batch_size, device, amp, view)]) if len(idx) else \
        torch.zeros((0,) + tuple(x.shape[-2:]), device=device)


@torch.inference_mode()
def predict_batches(model, x, idx, batch_size, device, amp=False, view=None):
    """Sigmoid probabilities (B, H, W) float32 per batch: (indices, probabilities) from forward_batches (the
    main output where the model has auxiliary heads)."""
    for b, out in forward_batches(model, x, idx, batch_size, device, amp, view):
        out = out[0] if isinstance(out, tuple) else out
        yield b, torch.sigmoid(out.float()[:, 0])


@torch.inference_mode()
def forward_batches(model, x, idx, batch_size, device, amp=False, view=None, fn=None):
    """The batched forward of every prediction loop: eval mode (BatchNorm's running statistics, no dropout),
    the device's memory format and autocast (--amp); yields (indices, the model's output) per batch of x[idx].
    view(xb) changes the input batch first (e.g. a flip, for test-time augmentation); fn(model, xb) replaces
    model(xb) where a script needs more than the output (e.g. the encoder's features)."""
    model.eval()
    idx = torch.as_tensor(np.asarray(idx), device=device, dtype=torch.long)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for b in batches(idx, batch_size):
        xb = to_input(x[b]) if view is None else view(to_input(x[b]))
        xb = xb.contiguous(memory_format=memory_format(device))
        with autocast(device, amp):
            out = model(xb) if fn is None else fn(model, xb)
        bad |= not_finite(out)
        yield b, out  # outside autocast: the caller's own arithmetic runs as it would without the helper
    if bad.device.type != "meta" and bad:  # one host sync, once the last batch is out (before a caller selects on
        # or reports its outputs); meta: benchmarks/speed.py counts FLOPs on tensors without data
        raise UserError(DIVERGED)


DIVERGED = ("the model's outputs hold NaN or inf: its training diverged (weights finite, activations not); start a "
            "new run with a lower --lr, or a smaller loss weight if you raised one (--resume keeps the run's flags)")


def not_finite(out):
    """Does any floating tensor in out (nested tuples, lists and dicts too) hold a NaN or inf? A device bool
    (no host sync), or False where out holds no such tensor (None, an int: an optional head's output)."""
    if isinstance(out, torch.Tensor):
        return ~torch.isfinite(out).all() if out.is_floating_point() else False
    bad = False
    for o in (out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()):
        bad = bad | not_finite(o)
    return bad


@torch.inference_mode()
def evaluate(model, x, y, idx, batch_size, device, amp=False, threshold=0.5):
    """Dice and IoU per image over the whole set (never averaged per batch); returns numpy arrays."""
    dices, ious = [], []
    for b, p in predict_batches(model, x, idx, batch_size, device, amp):
        d, i = dice_iou(p > threshold, y[b] > 0)
        dices.append(d)
        ious.append(i)
    if not dices:
        return np.zeros(0), np.zeros(0)
    return torch.cat(dices).cpu().numpy(), torch.cat(ious).cpu().numpy()


def enable_mc_dropout(model):
    """Monte Carlo dropout mode: everything in eval (BatchNorm uses its running statistics), dropout on."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d/2d/3d, AlphaDropout
            m.train()


@torch.inference_mode()
def mc_dropout(model, x, idx, T, batch_size, device, amp=False, batched=None, encoder_once=None):
    """Monte Carlo dropout: T stochastic passes with dropout on and BatchNorm in eval mode; yields (indices, mean,
    var) per batch, mean and var of the sigmoid probability per pixel (B, H, W), so a caller reduces as it goes
    and a pool of any size fits in memory.

    The loop below is the plain one: per batch, T passes, the moments of p summed as they come. What makes it
    fast is how a pass runs (benchmarks/speed.py times each path against T plain forwards;
    tests/test_speed_equivalence.py shows they compute the same thing):
    - encoder once (mc_passes): where dropout sits only after the encoder, the encoder runs once per batch.
    - batched: the T passes run as forwards of the batch repeated (up to 2^24 pixels, 256 images of 256^2,
      per forward), on CUDA; looped on the CPU, where looping measured faster (PERF_NOTES.md).
    `batched` and `encoder_once` (True/False) override the automatic choice."""
    enable_mc_dropout(model)
    batched = device.type == "cuda" if batched is None else batched
    passes_of = mc_passes(model, device, encoder_once)
    idx = torch.as_tensor(np.asarray(idx), device=device, dtype=torch.long)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for b in batches(idx, batch_size):
        xb = to_input(x[b]).contiguous(memory_format=memory_format(device))
        # sums of d = p - p0, p0 the first pass (the shifted-data form of Welford's method): E[p^2] - E[p]^2 in
        # float32 cancels to rounding noise where the model is confident (p ~ 1: var ~ 1e-8 < float32's 6e-8
        # spacing of p^2), which would scramble the ranking of the least uncertain samples; the moments of d
        # are of the size of the variance itself. (float64 would also do, but MPS has none.)
        s1 = torch.zeros((len(b),) + tuple(x.shape[-2:]), device=device)
        s2 = torch.zeros_like(s1)
        p0 = None
        # passes per forward: batched, as many as fit in 2^24 pixels (256 images of 256 x 256); looped, one
        per = max(1, min(T, 2 ** 24 // (len(b) * xb.shape[-1] * xb.shape[-2]))) if batched else 1
        with autocast(device, amp):
            forward = passes_of(xb)  # forward(r): the logits of r passes over xb, stacked (r x B, ...)
            for t in range(0, T, per):  # the T passes, `per` of them in each forward
                r = min(per, T - t)
                out = forward(r)
                out = out[0] if isinstance(out, tuple) else out
                p = torch.sigmoid(out.float()[:, 0]).reshape(r, len(b), *s1.shape[1:])
                if p0 is None:
                    p0 = p[0].clone()
                d = p.sub_(p0)  # in place: p is this pass's own tensor
                if r == 1:
                    s1.add_(d[0])
                    s2.addcmul_(d[0], d[0])
                else:
                    s1 += d.sum(0)
                    s2 += (d * d).sum(0)
        m1 = s1 / T
        bad |= not_finite((p0, s2))
        yield b, p0 + m1, (s2 / T - m1 * m1).clamp_(min=0)
    model.eval()
    if bad.device.type != "meta" and bad:  # as forward_batches
        raise UserError(DIVERGED)


def mc_variance(model, x, idx, T, batch_size, device, amp=False):
    """CEAL's image score (Sec. 4.1): the per-pixel variance of T MC-dropout passes, summed over the image; and the
    mean prediction thresholded at 0.5, the pseudo-label masks. Returns (scores (N,) numpy, masks (N, H, W) uint8
    on the device)."""
    scores, masks = [], []
    for _, mean, var in mc_dropout(model, x, idx, T, batch_size, device, amp):
        scores.append(var.sum((1, 2)))
        masks.append((mean > 0.5).to(torch.uint8))
    if not scores:
        return np.zeros(0, np.float32), torch.zeros((0,) + tuple(x.shape[-2:]), dtype=torch.uint8, device=device)
    return torch.cat(scores).cpu().numpy(), torch.cat(masks)


def mc_passes(model, device, encoder_once=None):
    """How mc_dropout runs its passes: returns passes_of(xb) -> forward, forward(r) the logits of r stochastic
    passes over the batch xb, stacked along the batch axis (r x B, ...), as model(xb repeated r times) gives.

    Encoder once: when dropout sits only at the bottleneck (model.dropout_at == "bottleneck", the public CEAL
    code's placement) or nowhere, model.encode(xb) runs once per batch and only model.decode r times. A model
    that knows its own layers may do better with model.mc_decoder(memory format), called once here: unet.UNet
    repeats only what depends on the dropout mask (its skip halves computed once, BatchNorm folded). Same
    numbers up to float rounding, and the same dropout masks as plain forwards under the same seed.
    encoder_once (True/False) overrides the automatic choice."""
    can_split = getattr(model, "dropout_at", "every") in ("bottleneck", "none") and hasattr(model, "encode")
    if encoder_once and not can_split:
        raise ValueError("encoder_once needs a model with dropout only at the bottleneck (model.dropout_at)")
    encoder_once = can_split if encoder_once is None else encoder_once
    fmt = memory_format(device)
    own = getattr(model, "mc_decoder", None) if encoder_once else None
    decoder = own(fmt) if own is not None else None  # None: the model's decoder is not one it can split

    def rep(t, r):  # the batch repeated r times, in the model's memory format
        return t.repeat(r, 1, 1, 1).contiguous(memory_format=fmt) if r > 1 else t

    def passes_of(xb):
        if not encoder_once:
            return lambda r: model(rep(xb, r))
        feats = model.encode(xb)
        if decoder is not None:
            return decoder(feats)
        return lambda r: model.decode([rep(f, r) for f in feats])
    return passes_of


# ---- Query rules shared by several scripts -----------------------------------------------------------------
def query_random(pool, k, rng):
    """Uniform without replacement from the pool, seeded."""
    return rng.choice(np.asarray(pool), size=min(k, len(pool)), replace=False)


def top_k(pool, scores, k, largest=True, rng=None):
    """The k pool samples with the largest (or smallest) score. Ties: with rng (a seeded numpy Generator) in
    a random order drawn from it (one permutation of the pool per call, whether or not there are ties);
    without, by pool order (stable), so the lowest pool positions win."""
    key = -np.asarray(scores, dtype=np.float64) if largest else np.asarray(scores, dtype=np.float64)
    perm = np.arange(len(key)) if rng is None else rng.permutation(len(key))
    order = perm[np.argsort(key[perm], kind="stable")]
    return np.asarray(pool)[order[:k]]


def binary_entropy(p, two_term=True):
    """Per-pixel entropy in bits of a Bernoulli probability map. two_term=False gives -p log2 p alone (the
    region paper's printed formula)."""
    p = p.float().clamp(1e-7, 1 - 1e-7)
    h = -p * torch.log2(p)
    return h - (1 - p) * torch.log2(1 - p) if two_term else h


def entropy_scores(probs, two_term=True, reduce="sum"):
    """Image entropy score (B,) from probabilities (B, H, W): sum (default) or mean over pixels."""
    h = binary_entropy(probs, two_term).flatten(1)
    return h.sum(1) if reduce == "sum" else h.mean(1)


def ensemble_variance(probs):
    """Suggestive Annotation's (and ASA-style) uncertainty: pixel variance across the M models' probabilities
    (M, B, H, W), averaged over pixels -> (B,)."""
    return probs.float().var(0, unbiased=False).flatten(1).mean(1)


def head_agreement(lower, middle, final):
    """DSAL's score from binarised masks (B, H, W) of the deep-supervision heads: the mean of
    Dice(lower, final) and Dice(middle, final) per image -> (B,); also returns the two terms."""
    l_dsc, m_dsc = dice_iou(lower, final)[0], dice_iou(middle, final)[0]
    return (l_dsc + m_dsc) / 2, l_dsc, m_dsc


def kmeans(feats, k, seed, n_init=10, weight=None):
    """scikit-learn's KMeans (k-means++, n_init restarts, the lowest inertia kept) fitted to feats (N, d) in
    float64, on one thread: its threads sum partial centres in finishing order, so two runs could differ. Fewer
    distinct rows than k (identical images) leave clusters empty: one note line says so, for scikit-learn's
    two-line ConvergenceWarning."""
    from sklearn.cluster import KMeans  # here, not at the top: a second of import for the scripts without K-means
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits  # installed with scikit-learn
    feats = np.asarray(feats, np.float64)
    distinct = len(np.unique(feats, axis=0))
    if distinct < k:
        print(f"note: {distinct} distinct feature vectors among the {len(feats)} pool samples (identical images?), "
              f"fewer than the {k} clusters: {k - distinct} cluster(s) stay empty")
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Number of distinct clusters", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(
            feats, sample_weight=None if weight is None else np.asarray(weight, np.float64))


def ceal_groups(scores, n_low, n_high, n_band, n_pseudo, rng, bins=80, band_bins=6, band="paper", pseudo="nearest"):
    """CEAL's selection (ceal_mcdropout.md, Sec. 4.2) on the pool's uncertainty scores; returns positions
    into `scores` for the four groups, on the histogram of the scores in `bins` bins (Fig. 6; the reference
    code of Gorriz et al. uses 80):
    1. the n_low lowest scores (lesions the model missed) -> oracle;
    2. the n_high highest scores -> oracle (paper: "a high uncertainty score"; the reference code's
       most_uncertain_index draws them at random from the sparsest of its top histogram bins);
    3. n_band drawn at random from the low-uncertainty band -> oracle. The paper: samples that "get mixed
       up with the highly confident samples" (group 4, which sits at the histogram's mode). Two readings:
       band="paper" (default): every score up to band_bins bins above the mode bin, the mode bin and all
       below it included (scores <= the upper edge of bin mode + band_bins);
       band="reference": the reference code's random_index / get_thirt_index, the interval from the lower
       edge of bin mode + band_bins to the lower edge of bin bins - 33 (bin 47 of 80), so above the mode
       and never in it (empty when the mode sits at bin 41 or higher);
    4. n_pseudo "highly confident" samples at the histogram's mode -> pseudo-labelled by the model.
       pseudo="nearest" (default): the n_pseudo closest to the centre of the mode bin, deterministic, so
       the paper's count is met, reaching into the neighbouring bins when the mode bin holds fewer;
       pseudo="reference": the reference code's get_pseudo_index, a random draw inside the mode bin, fewer
       than n_pseudo when the bin holds fewer.
    Groups never overlap (the reference code draws the pseudo-labels from the whole pool, oracle picks
    included). A band holding fewer than n_band samples is filled with the next-lowest scores, so the oracle
    budget is constant (the reference queries fewer); a small pool serves the oracle first (ssl_coldstart's CEAL too)."""
    if band not in ("paper", "reference") or pseudo not in ("nearest", "reference"):
        raise ValueError(f"ceal_groups: band {band!r} or pseudo {pseudo!r} unknown")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    low = order[:n_low]
    low_set = set(low.tolist())
    high = np.array([i for i in order[::-1] if i not in low_set][:n_high], dtype=np.int64)
    taken = low_set | set(high.tolist())
    counts, edges = np.histogram(scores, bins=bins)
    mode = int(np.argmax(counts))
    if band == "paper":
        inside = scores <= edges[min(mode + 1 + band_bins, bins)]
    else:  # reference: interval(uncertain, edges[mode + 6], edges[80 - 33]), i.e. start <= score < end
        inside = (scores >= edges[min(mode + band_bins, bins)]) & (scores < edges[bins - 33])
    candidates = np.array([i for i in order if i not in taken and inside[i]], dtype=np.int64)
    band_ = rng.choice(candidates, size=min(n_band, len(candidates)), replace=False) if len(candidates) else candidates
    if len(band_) < n_band:  # a thin band: the oracle budget stays the same, filled with the next-lowest scores
        cand = set(candidates.tolist())
        band_ = np.concatenate([band_, [i for i in order if i not in taken and i not in cand][:n_band - len(band_)]])
    taken |= set(band_.tolist())
    rest = np.array([i for i in order if i not in taken], dtype=np.int64)
    if pseudo == "nearest":
        centre = (edges[mode] + edges[mode + 1]) / 2
        pick = rest[np.argsort(np.abs(scores[rest] - centre), kind="stable")[:n_pseudo]]
    else:  # reference: interval(uncertain, edges[mode], edges[mode + 1]), shuffled, the first n_pseudo
        in_mode = rest[(scores[rest] >= edges[mode]) & (scores[rest] < edges[mode + 1])]
        pick = rng.choice(in_mode, size=min(n_pseudo, len(in_mode)), replace=False) if len(in_mode) else in_mode
    return low.astype(np.int64), high, band_.astype(np.int64), pick.astype(np.int64)


# ---- Training targets with pseudo-labels (CEAL; the CEAL and DSAL comparators of ssl_coldstart) ------------
UNLABELLED = 255  # the target of a sample nobody has labelled: caught if it is ever trained on (add_labels)


def training_target(y, labeled, pseudo=(), pseudo_masks=None):
    """The training target of a new run, or of a resumed one: the ground truth of the labelled set, the
    model's masks of the pseudo-labelled one (pseudo_masks, checkpointed), UNLABELLED elsewhere."""
    at = lambda ids: torch.as_tensor(np.asarray(ids, np.int64), device=y.device)
    target = torch.full_like(y, UNLABELLED)
    target[at(labeled)] = y[at(labeled)]
    if pseudo_masks is not None:
        target[at(pseudo)] = pseudo_masks.to(y.device)
    return target


def add_labels(target, y, groups, masks, labeled, pseudo, pool, redraw=False):
    """A round's picks join the training set (CEAL Sec. 4.3): the oracle's groups (every `how` but "pseudo")
    with the ground truth, the "pseudo" group with the model's masks (masks), never the truth. The pseudo-
    labelled leave the pool for good and keep their label; redraw (the CEAL reference code; DSAL [5]): last
    round's pseudo-labels go back unlabelled and the new ones stay in the pool. target is changed in place.
    Returns (labeled, pseudo, pool)."""
    at = lambda ids: torch.as_tensor(np.asarray(ids, np.int64), device=y.device)
    oracle = np.concatenate([g for how, g in groups.items() if how != "pseudo"])
    new = groups.get("pseudo", np.zeros(0, np.int64))
    if redraw and "pseudo" in groups:
        target[at(pseudo)] = UNLABELLED
        pseudo = np.zeros(0, np.int64)
    labeled, pseudo = np.concatenate([labeled, oracle]), np.concatenate([pseudo, new])
    pool = np.setdiff1d(pool, oracle if redraw else np.concatenate([oracle, new]))
    target[at(oracle)] = y[at(oracle)]  # the oracle reveals the ground truth
    if "pseudo" in groups:
        target[at(new)] = masks  # the model's masks
    if bool((target[at(np.concatenate([labeled, pseudo]))] == UNLABELLED).any()):
        raise RuntimeError(f"a training sample has no label (target {UNLABELLED}): a bug in the sets")
    return labeled, pseudo, pool


# ---- A round's row of rounds.csv and its picks (the run folder itself: runfolder.py) -------------------------
def mean_std(values):
    """Mean and std (ddof 0) of per-image values, as floats; nan and nan for no values (a run with no test set,
    --oracle folder on images only), without numpy's empty-mean warnings."""
    return (float(np.mean(values)), float(np.std(values))) if len(values) else (math.nan, math.nan)


def round_row(rnd, labeled, pseudo, dice, iou, train_s, select_s, **extra):
    """A row of rounds.csv: ROUND_COLUMNS (the test set's Dice mean and std over images, and its mean IoU; the
    counts of labelled and pseudo-labelled samples), then the script's own columns, in the order given."""
    (dice_mean, dice_std), iou_mean = mean_std(dice), mean_std(iou)[0]
    return {"round": rnd, "labeled": labeled, "pseudo": pseudo, "dice_mean": dice_mean, "dice_std": dice_std,
            "iou_mean": iou_mean, "train_s": train_s, "select_s": select_s, **extra}


@torch.inference_mode()
def save_picks(run, rnd, model, data, x, groups, scores, batch_size, device, amp=False, per_group=16):
    """picks/round_<K>.png: what the rule asked for this round, so a user can see it. One row per pick
    (up to per_group of each group): image, ground truth (the hidden mask the oracle reveals), the model's
    prediction at selection time (the model that scored the pool, eval mode) and a caption with the group,
    the sample id and its score (plots.picks_sheet draws it). groups: {how: data indices}; scores: {data
    index: score} (or None). The numbers behind it are in pool_scores.csv."""
    rows = [(how, int(i)) for how, idx in groups.items() for i in list(np.asarray(idx).reshape(-1))[:per_group]]
    if not rows:
        return None
    probs = predict(model, x, np.array([i for _, i in rows], dtype=np.int64), batch_size, device, amp)
    os.makedirs(run.path("picks"), exist_ok=True)
    path = run.path(os.path.join("picks", f"round_{rnd}.png"))
    picks_sheet(path, data, rows, probs.float().cpu().numpy(), list(groups), scores)
    return path
