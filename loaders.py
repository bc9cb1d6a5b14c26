"""Data for the active-learning scripts: the official archive layouts, read unmodified, decoded once into a
uint8 cache, split with a seed; and a synthetic generator. Bad input raises UserError, which every script
turns into one line and exit status 2 (common.run_main). common.py re-exports what the scripts call
(common.load_data, common.make_splits, ...).
"""
import concurrent.futures
import filecmp
import fnmatch
import glob
import hashlib
import json
import os
import re
import struct
import time
import unicodedata
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Pillow's warnings about files it still decodes (e.g. "Corrupt EXIF data" in a cut TIFF) would add lines to the
# one-line errors; a file it cannot decode is still an error naming it (read_image)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
# Pillow's decompression-bomb limit (178 Mpx an error, 89 Mpx a warning) guards servers from hostile uploads; we read
# the user's own files, and whole-slide or large scans are bigger
Image.MAX_IMAGE_PIXELS = None


class UserError(Exception):
    """Bad input a user can fix: printed as one line, exit status 2, no traceback (see common.run_main)."""


# ----------------------------------------------------------------------------------------------------------
# Data: the official layouts, read unmodified
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    x: np.ndarray                 # (N, C, S, S) uint8 images
    y: np.ndarray                 # (N, S, S) uint8 masks in {0, 1}
    ids: list                     # sample ids (file stems), used in every file the run writes
    official: dict = field(default_factory=dict)   # split name -> indices, where the dataset defines splits
    groups: np.ndarray = None     # patient of each sample (lgg): splits never cut a group
    name: str = ""
    positive: np.ndarray = None   # (N,) bool: the mask has foreground at full resolution (files' own size)
    files: list = None            # each sample's image file as found (None: made in memory, e.g. synthetic)

    def __len__(self):
        return len(self.ids)

    def subset(self, keep):
        keep = np.asarray(keep)
        pos = -np.ones(len(self.ids), dtype=np.int64)
        pos[keep] = np.arange(len(keep))
        official = {k: pos[v][pos[v] >= 0] for k, v in self.official.items()}
        return Data(self.x[keep], self.y[keep], [self.ids[i] for i in keep], official,
                    None if self.groups is None else self.groups[keep], self.name,
                    None if self.positive is None else self.positive[keep],
                    None if self.files is None else [self.files[i] for i in keep])


IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".webp")


def _files(folder, patterns, what):
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: {'a file, not a folder' if os.path.exists(folder) else 'folder not found'}; "
                        f"expected {what}")
    found = glob_files(folder, patterns)
    if not found:
        raise UserError(f"no files found under {folder}: expected {what}")
    return found


def _keyed(paths, key):
    """{key(path): path}; two files of one sample (a.png beside a.jpg, a_mask.png beside a.png) are an error,
    not one of them dropped in silence."""
    out = {}
    for p in paths:
        k = key(p)
        if k in out:
            raise UserError(f"{out[k]} and {p}: two files for sample {k!r}; keep one")
        out[k] = p
    return out


def _pair(images, masks, image_key, mask_key, image_dir, mask_dir, mask_what):
    """Pair image and mask paths by key; an image without a mask (or the reverse) is an error."""
    by_key = _keyed(masks, mask_key)
    img_keys = _keyed(images, image_key)
    missing = sorted(set(img_keys) - set(by_key))
    if missing:
        raise UserError(f"{img_keys[missing[0]]}: no mask for this image in {mask_dir} (expected {mask_what}); "
                        f"{len(missing)} image(s) lack a mask")
    extra = sorted(set(by_key) - set(img_keys))
    if extra:
        raise UserError(f"{by_key[extra[0]]}: mask without an image in {image_dir}; {len(extra)} mask(s) lack an image")
    return [(k, img_keys[k], by_key[k]) for k in sorted(img_keys)]


def _stem(path):  # NFC: a name macOS wrote decomposed (e + combining accent) pairs with the composed one
    return unicodedata.normalize("NFC", os.path.splitext(os.path.basename(path))[0])


def _isic_pairs(root, image_dir, mask_dir):
    imgs = [f for f in _files(os.path.join(root, image_dir), ["ISIC_*.jpg", "ISIC_*.png"], "ISIC_*.jpg images")
            if not f.endswith("_superpixels.png")]
    masks = _files(os.path.join(root, mask_dir), ["ISIC_*_segmentation.png"], "ISIC_*_segmentation.png masks")
    return _pair(imgs, masks, _stem, lambda m: _stem(m)[: -len("_segmentation")], os.path.join(root, image_dir),
                 os.path.join(root, mask_dir), "ISIC_<id>_segmentation.png")


def list_isic2017(root):
    splits = {"train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
              "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
              "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth")}
    return _official(root, splits, _isic_pairs, "ISIC-2017_Training_Data/ and ISIC-2017_Training_Part1_GroundTruth/")


def list_isic2018(root):
    splits = {k: (f"ISIC2018_Task1-2_{s}_Input", f"ISIC2018_Task1_{s}_GroundTruth")
              for k, s in (("train", "Training"), ("val", "Validation"), ("test", "Test"))}
    return _official(root, splits, _isic_pairs, "ISIC2018_Task1-2_Training_Input/ and ISIC2018_Task1_Training_GroundTruth/")


def _official(root, splits, lister, what):
    if not os.path.isdir(os.path.join(root, splits["train"][0])):
        raise UserError(f"{root}: expected the official layout with {what} (found: {sorted(os.listdir(root))[:8]})")
    entries = []
    for split, (img_dir, mask_dir) in splits.items():
        if split != "train" and not os.path.isdir(os.path.join(root, img_dir)):
            print(f"note: {os.path.join(root, img_dir)} not found; no official {split} split")
            continue
        entries += [(k, i, m, split, None) for k, i, m in lister(root, img_dir, mask_dir)]
    return entries


def list_ph2(root):
    base = os.path.join(root, "PH2 Dataset images") if os.path.isdir(os.path.join(root, "PH2 Dataset images")) else root
    cases = sorted(d for d in glob.glob(os.path.join(glob.escape(base), "IMD*")) if os.path.isdir(d))
    if not cases:
        raise UserError(f"{base}: no IMDxxx case folders; expected 'PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/"
                        f"IMDxxx.bmp' and 'IMDxxx_lesion/IMDxxx_lesion.bmp'")
    entries = []
    for case in cases:
        c = os.path.basename(case)
        img = os.path.join(case, f"{c}_Dermoscopic_Image", f"{c}.bmp")
        mask = os.path.join(case, f"{c}_lesion", f"{c}_lesion.bmp")
        if not os.path.isfile(img):
            raise UserError(f"{img}: image not found (expected IMDxxx_Dermoscopic_Image/IMDxxx.bmp in {case})")
        if not os.path.isfile(mask):
            raise UserError(f"{mask}: no mask for {img} (expected IMDxxx_lesion/IMDxxx_lesion.bmp)")
        entries.append((c, img, mask, None, None))
    return entries


def list_cvc(root):
    exts = ["*.tif", "*.tiff", "*.png", "*.bmp", "*.jpg"]
    img_dir, mask_dir = os.path.join(root, "Original"), os.path.join(root, "Ground Truth")
    pairs = _pair(_files(img_dir, exts, "Original/N.tif frames"), _files(mask_dir, exts, "Ground Truth/N.tif masks"),
                  _stem, _stem, img_dir, mask_dir, "Ground Truth/<N>.tif")
    pairs.sort(key=lambda p: (len(p[0]), p[0]))  # numeric order: 1, 2, ..., 612
    return [(k, i, m, None, None) for k, i, m in pairs]


MASK_SUFFIXES = ("_mask", "_segmentation", "_lesion", "_manual1")


def _mask_stem(path):
    """The image stem a mask file names: its stem less a MASK_SUFFIXES suffix, in any letter case (a_MASK.png)."""
    s = _stem(path)
    for suf in MASK_SUFFIXES:
        if s.lower().endswith(suf):
            return s[: -len(suf)]
    return s


def subfolder(root, name):
    """root/name, its name matched regardless of case (Images/ from a Windows or macOS export); two matches are an
    error, not one picked in silence."""
    found = sorted(d for d in os.listdir(root) if d.lower() == name and os.path.isdir(os.path.join(root, d)))
    if len(found) > 1:
        raise UserError(f"{root}: found {'/, '.join(found)}/: keep one {name}/ folder")
    files = sorted(d for d in os.listdir(root) if d.lower() == name)  # else a file of that name (Images): named
    return os.path.join(root, found[0] if found else files[0] if files else name)


def list_folder(root, what="images/ and masks/ paired by file stem (a mask stem may add _mask, _segmentation, "
                           "_lesion or _manual1)"):
    glob_files(root, [])  # a folder that cannot be listed: one line, not a traceback from os.listdir
    img_dir, mask_dir = subfolder(root, "images"), subfolder(root, "masks")
    if not os.path.isdir(img_dir):
        if os.path.exists(img_dir):
            raise UserError(f"{img_dir}: a file, not a folder; expected the folder of the images")
        if os.path.basename(root).lower() in ("images", "masks"):
            raise UserError(f"{root} is itself the {os.path.basename(root)} folder: point --data-dir at its parent "
                            f"{os.path.dirname(root)}")
        inner = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d, "images"))]
        down = f"; the layout is one folder down: --data-dir {os.path.join(root, inner[0])}?" if inner else ""
        raise UserError(f"{root}: expected {what} (found: {sorted(os.listdir(root))[:8]}){down}")
    pats = ["*" + e for e in IMAGE_EXT]
    images = _files(img_dir, pats, "image files")
    if os.path.exists(mask_dir) and not os.path.isdir(mask_dir):
        raise UserError(f"{mask_dir}: a file, not a folder; expected the folder of the masks")
    masks = glob_files(mask_dir, pats) if os.path.isdir(mask_dir) else []
    stems = _keyed(images, _stem)
    # images/a_mask.png beside images/a.png, the very file masks/a_mask.png: a's mask copied among the images (an
    # image named so, with a mask of its own, is an image: Kvasir's p0.png and p0_lesion.png side by side)
    named = {os.path.basename(m): m for m in masks}
    strays = [i for i in images if _mask_stem(i) != _stem(i) and _mask_stem(i) in stems
              and os.path.basename(i) in named and filecmp.cmp(i, named[os.path.basename(i)], shallow=False)]
    if strays:
        raise UserError(f"{strays[0]}: a mask among the images? its name adds a mask suffix to the image "
                        f"{stems[_mask_stem(strays[0])]}; expected masks in {mask_dir} ({len(strays)} such file(s))")
    mask_key = lambda m: _stem(m) if _stem(m) in stems else _mask_stem(m)  # a_lesion.png's mask may be a_lesion.png
    by_key = _keyed(masks, mask_key)
    # ... or moved there (not copied): neither it nor the image its name points to has a mask, and it holds two
    # values at most, as a mask does (a photo named a_mask.png does not)
    moved = [i for i in images if _mask_stem(i) != _stem(i) and _mask_stem(i) in stems
             and not {_stem(i), _mask_stem(i)} & by_key.keys() and _two_valued(i)]
    if moved:
        raise UserError(f"{moved[0]}: a mask among the images? its name adds a mask suffix to the image "
                        f"{stems[_mask_stem(moved[0])]}, which has no mask, and it holds two values at most; expected "
                        f"masks in {mask_dir} ({len(moved)} such file(s))")
    for sub in (img_dir, mask_dir):
        nested = [f for f in glob.glob(os.path.join(glob.escape(sub), "*", "**", "*"), recursive=True)
                  if f.lower().endswith(IMAGE_EXT)]
        if nested:
            print(f"note: {len(nested)} image files in subfolders of {sub} (e.g. {nested[0]}) are not read; "
                  f"only the files directly in it are")
    if not masks or len(by_key.keys() & stems.keys()) < len(stems):
        # images without masks: a set to label yourself (--oracle folder; split_data refuses it otherwise).
        # They are the pool ("unlabelled"); the images that have a mask are the test set.
        extra = sorted(set(by_key) - {_stem(i) for i in images})
        if extra:
            raise UserError(f"{by_key[extra[0]]}: mask without an image in {img_dir}; {len(extra)} mask(s) lack an image")
        return [(_stem(i), i, by_key.get(_stem(i)), "test" if _stem(i) in by_key else "unlabelled", None)
                for i in sorted(images, key=_stem)]
    pairs = _pair(images, masks, _stem, mask_key, img_dir, mask_dir, "masks/<stem>[_mask].<ext>")
    return [(k, i, m, None, None) for k, i, m in pairs]


def _two_valued(path):
    """True where the image file holds two grey values at most (a binary mask); False for anything else, an
    unreadable file included (the loader names that one when it decodes it)."""
    try:
        with Image.open(path) as im:
            return im.convert("L").getcolors(2) is not None
    except Exception:
        return False


def glob_files(folder, patterns):
    """The files directly in `folder` whose names match one of the glob `patterns` in any letter case (a.Jpg,
    a.JPG), hidden ones (.name, macOS's ._a.jpg) left out, as glob does."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"{folder}: permission denied (the folder cannot be listed)")
    pats = [p.lower() for p in patterns]
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if not n.startswith(".") and any(fnmatch.fnmatchcase(n.lower(), p) for p in pats))


def write_folder(data, root):
    """Write a Data set in the folder layout (images/<id>.png, masks/<id>_mask.png, masks 0/255): how the
    synthetic set becomes a dataset every script reads with --data folder (README: Compare methods)."""
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for x, y, i in zip(data.x, data.y, data.ids):
        Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(os.path.join(root, "images", f"{i}.png"))
        Image.fromarray((y > 0).astype(np.uint8) * 255).save(os.path.join(root, "masks", f"{i}_mask.png"))
    return root


def list_lgg(root):
    if os.path.isdir(os.path.join(root, "kaggle_3m")):
        root = os.path.join(root, "kaggle_3m")
    patients = sorted(d for d in glob.glob(os.path.join(glob.escape(root), "TCGA_*")) if os.path.isdir(d))
    if not patients:
        raise UserError(f"{root}: no TCGA_<patient> folders; expected kaggle_3m/TCGA_*/TCGA_..._<slice>.tif "
                        f"with ..._<slice>_mask.tif")
    entries = []
    for d in patients:
        files = glob.glob(os.path.join(glob.escape(d), "*.tif"))
        imgs = [f for f in files if not f.endswith("_mask.tif")]
        masks = [f for f in files if f.endswith("_mask.tif")]
        patient = "_".join(os.path.basename(d).split("_")[:3])  # TCGA_CS_4941 (the folder adds a date)
        for k, i, m in _pair(imgs, masks, _stem, _mask_stem, d, d, "<slice>_mask.tif"):
            entries.append((k, i, m, None, patient))
    for e in entries:
        if not re.search(r"_\d+$", e[0]):
            raise UserError(f"{e[1]}: expected TCGA_<patient>_<date>_<slice>.tif (the slice a number)")
    entries.sort(key=lambda e: (e[4], int(e[0].rsplit("_", 1)[1])))
    return entries


LISTERS = {"isic2017": list_isic2017, "isic2018": list_isic2018, "ph2": list_ph2, "cvc-clinicdb": list_cvc,
           "kvasir-seg": lambda r: list_folder(r, "Kvasir-SEG layout: images/*.jpg and masks/*.jpg"),
           "lgg": list_lgg, "folder": list_folder}


def read_raw_tiff(path):
    """Uncompressed, chunky, 8-bit strip TIFF (CVC-ClinicDB frames are 3-sample TIFFs marked BlackIsZero,
    which Pillow refuses). Returns (H, W, samples) uint8."""
    with open(path, "rb") as f:
        b = f.read()
    if b[:4] not in (b"II*\x00", b"MM\x00*"):
        raise ValueError("not a TIFF file")
    bo = "<" if b[:2] == b"II" else ">"
    (ifd,) = struct.unpack(bo + "I", b[4:8])
    (n,) = struct.unpack(bo + "H", b[ifd:ifd + 2])
    tags = {}
    for i in range(n):
        tag, typ, cnt = struct.unpack(bo + "HHI", b[ifd + 2 + 12 * i: ifd + 10 + 12 * i])
        size = {3: 2, 4: 4}.get(typ)
        if size is None:
            continue
        fmt = bo + ("H" if typ == 3 else "I") * cnt
        raw = b[ifd + 10 + 12 * i: ifd + 14 + 12 * i]
        if size * cnt > 4:
            (off,) = struct.unpack(bo + "I", raw)
            raw = b[off: off + size * cnt]
        tags[tag] = struct.unpack(fmt, raw[: size * cnt])
    w, h = tags[256][0], tags[257][0]
    spp, bits = tags.get(277, (1,))[0], tags.get(258, (8,))
    if tags.get(259, (1,))[0] != 1 or set(bits) != {8} or tags.get(284, (1,))[0] != 1:
        raise ValueError("only uncompressed 8-bit chunky TIFF is supported")
    data = b"".join(b[o: o + c] for o, c in zip(tags[273], tags[279]))
    return np.frombuffer(data, np.uint8)[: w * h * spp].reshape(h, w, spp)


def to_8bit(im):
    """A 16-bit, 32-bit or float image (radiographs, MRI and DICOM exports) to 8 bits by the min and max of its
    finite pixels (NaN and inf, e.g. a float export's background, go to the min; a constant image: black);
    Pillow's convert would clip every value above 255 to white."""
    a = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(a)
    lo, hi = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 0.0)
    a = np.where(finite, a, lo)
    return Image.fromarray(np.round((a - lo) * (255 / (hi - lo) if hi > lo else 0)).astype(np.uint8))


def read_image(path, mode, size=None, with_size=False, mask=False):
    """Decode with Pillow (falling back to the raw TIFF reader); mode 'RGB' or 'L'. With `size`, a JPEG is
    decoded at the smallest DCT scale that is still at least size x size (much faster for ISIC's photos).
    An image of more than 8 bits per pixel is scaled to 8 by its own range (to_8bit); a mask (mask=True) by
    mask_8bit, so that binarise_mask sees its middle values. A mask's
    transparent pixels are black (a drawing on a transparent layer).
    with_size: return (image, (width, height) as stored in the file, before any draft scaling)."""
    try:
        with Image.open(path) as im:
            stored = im.size
            if size and im.format == "JPEG":
                im.draft(mode, (size, size))
            im.load()
            if not mask and (im.mode in ("I", "F") or im.mode.startswith("I;16")):
                im = to_8bit(im)
            if mask and (im.mode == "I" or im.mode.startswith("I;16")):
                im = Image.fromarray(mask_8bit(np.asarray(im)))
            if mask and (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):  # transparent: black
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
            if mask and im.mode in ("P", "RGB", "RGBA"):
                im = colour_mask(im, path)
            out = im.convert(mode) if im.mode != mode else im.copy()
    except UserError:
        raise
    except Exception as e:
        try:
            a = read_raw_tiff(path)
        except Exception:
            empty = os.path.isfile(path) and os.path.getsize(path) == 0  # a copy or a save cut short
            why = "an empty file, 0 bytes" if empty else f"{type(e).__name__}: {e}"
            raise UserError(f"{path}: unreadable image file ({why})")
        stored = (a.shape[1], a.shape[0])
        out = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a[..., :3]).convert(mode)
    return (out, stored) if with_size else out


def mask_8bit(a):
    """A 16-bit (or 32-bit integer) mask as 8 bits: values up to 255 as they are (0/1, 0/255 saved in 16 bits),
    else scaled by its own maximum (0/1000, 0/4095, 0/65535 -> 0/255; soft edges to their halves). Pillow's own
    conversion clips every value above 255 to 255, so a 16-bit photo saved as a mask read as 93 % foreground,
    not as "not binary"; scaled, its middle values stay in the middle. Negative values count as 0."""
    a = np.clip(a, 0, None)
    top = int(a.max()) if a.size else 0
    return a.astype(np.uint8) if top <= 255 else np.round(a * (255 / top)).astype(np.uint8)


def colour_mask(im, path):
    """A palette or colour mask, as annotation tools write them (a palette index, or a colour, per class): with
    black and one other colour, that colour is the object (0/255), whatever its brightness (red is 76 in grey).
    A grey one (a JPEG's chroma noise included), or one of more colours bright enough, stays as it is, for
    binarise_mask; a dark one whose pixels are all shades of one colour, the half shades only where the object
    meets black (a drawing's soft edges, a JPEG's noise), becomes that shade, 0..255, for binarise_mask; one of
    more colours, all dark, is an error that says so (a class map: dark red and dark olive, say)."""
    rgb = np.asarray(im.convert("RGB"))
    if int((rgb.max(-1) - rgb.min(-1)).max()) <= 64:
        return im
    colours = np.unique((rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2])
    if len(colours) == 2 and colours[0] == 0:
        return Image.fromarray(np.where(rgb.any(-1), 255, 0).astype(np.uint8))
    if np.asarray(im.convert("L")).max() >= 128:  # e.g. a bright JPEG one: its grey values, as before
        return im
    flat = rgb.reshape(-1, 3).astype(np.float32)  # dark: one colour c on black, with soft edges or JPEG noise?
    c = flat[flat.sum(1).argmax()]
    t = np.clip(flat @ c / (c @ c), 0, 1)  # each pixel's shade of c: the object where it is at least half
    t = t.reshape(rgb.shape[:2])
    mid = (t > 0.25) & (t < 0.75)  # an edge's shades lie between the object and black; a second class's do not
    if np.abs(flat - t.reshape(-1, 1) * c).max() <= 64 and not (mid & ~(_near(t >= 0.75) & _near(t <= 0.25))).any():
        return Image.fromarray(np.round(t * 255).astype(np.uint8))
    raise UserError(f"{path}: a colour mask with {len(colours)} colours"
                    f"{'' if colours[0] == 0 else ', none of them black'}; expected one object colour on black (or "
                    f"a white object on black, or 0/1 values)")


def _near(b, r=2):
    """Pixels within r of a True pixel of the 2-D bool b (a (2r + 1)^2 square)."""
    return np.lib.stride_tricks.sliding_window_view(np.pad(b, r), (2 * r + 1, 2 * r + 1)).any((-2, -1))


def binarise_mask(m, path):
    """Masks are 0/255 (JPEG noise, CVC-ClinicDB's stray values 1..12) or 0/1; threshold at >127."""
    top = int(m.max())
    if top <= 1:
        return m.astype(np.uint8)
    if top < 128:
        raise UserError(f"{path}: mask values 0..{top} are not binary; expected 0/255 (or 0/1). A label map?")
    mid = float(((m > 50) & (m < 205)).mean())
    if mid > 0.05:
        raise UserError(f"{path}: mask is not binary ({mid:.0%} of pixels between 50 and 205); expected 0/255")
    return (m > 127).astype(np.uint8)


def _exif_orientation(path):
    """An image's EXIF orientation tag: 1 (or None) as stored; 2-8 a viewer flips or turns it (5-8 by 90
    degrees). Never applied here: images are read as stored, as the official datasets' masks are made."""
    try:
        with Image.open(path) as im:
            return im.getexif().get(0x0112)
    except Exception:
        return None


def _decode(entry, size, channels):
    """One pair resized to size x size: (image (C, S, S), mask (S, S) in {0, 1}, whether the mask has any
    foreground at the files' own resolution, whether the image has an EXIF orientation tag that a viewer
    applies). An image and mask of different sizes is a pairing error."""
    key, img_path, mask_path = entry[:3]
    im, im_size = read_image(img_path, "RGB" if channels == 3 else "L", size, with_size=True)
    im = im.resize((size, size), Image.BILINEAR)
    if mask_path is None:  # an image to be labelled by a person (--oracle folder): no mask yet
        m = np.zeros((im_size[1], im_size[0]), np.uint8)
    else:
        m = binarise_mask(np.asarray(read_image(mask_path, "L", mask=True)), mask_path)
    turn = _exif_orientation(img_path)  # read once: the note of load_data, and the hint below
    if (m.shape[1], m.shape[0]) != im_size:
        raise UserError(f"{img_path} is {im_size[0]}x{im_size[1]} but its mask {mask_path} is {m.shape[1]}x"
                        f"{m.shape[0]}: an image and its mask must have the same size (a mispaired file?"
                        + (" Or the mask follows the image as a viewer turns it by its EXIF orientation tag; images "
                           "are read as stored, so the mask must be too)" if (m.shape[0], m.shape[1]) == im_size
                           and turn in (5, 6, 7, 8) else ")"))
    x = np.asarray(im, dtype=np.uint8)
    x = x[None] if channels == 1 else x.transpose(2, 0, 1)
    return x, resize_mask(m, size), bool(m.any()), turn not in (None, 1)


def resize_mask(m, size):
    """A {0, 1} mask of any size -> size x size in {0, 1}: bilinear on 0/255, then >= 128 (the loader's rule,
    also applied to an annotator's label files)."""
    return (np.asarray(Image.fromarray(m * 255).resize((size, size), Image.BILINEAR)) >= 128).astype(np.uint8)


CACHE_VERSION = 4  # bump when decoding changes (2: JPEG draft decoding; 3: full-resolution `positive`;
#                    4: images of more than 8 bits scaled by their range, not clipped; masks' transparency black)


def cache_dir():
    return os.environ.get("ALSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alseg")


def _cache_folder():
    """The cache folder, made if missing. One that cannot be used is an error, not a run without a cache: that
    would decode the whole dataset again on every run (minutes for ISIC) behind a warning line easily missed."""
    d = cache_dir()
    fix = "set $ALSEG_CACHE to a writable folder for the data cache"
    if os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"{d}: is a file, not a folder; {fix}")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UserError(f"{d}: the cache folder cannot be created ({e.strerror}); {fix}")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{d}: the cache folder is not writable; {fix}")
    return d


def _read_cache(path, shapes):
    """(x, y, positive, turned) from a cache file, or None when it is missing or cannot be read: a damaged file (cut
    by a full disk or a copy stopped midway) is only a copy, decoded again and rewritten, not an error. turned: which
    images carry an EXIF orientation tag; a cache written before it was kept is decoded again, once."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = z["x"], z["y"], z["positive"], z["turned"] if "turned" in z.files else None
        if [a.shape for a in arrays[:3]] != shapes or arrays[3] is not None and arrays[3].shape != shapes[2]:
            raise ValueError(f"arrays of shapes {[a.shape for a in arrays if a is not None]}, expected {shapes}")
        return arrays if arrays[3] is not None else None
    except Exception as e:
        why = (str(e).splitlines() or [""])[0][:120]
        print(f"warning: cache file {path} cannot be read ({type(e).__name__}: {why}); decoding the data again")
        return None


def load_data(name, data_dir=None, size=64, channels=3, seed=0, n=None, workers=0, quiet=False):
    """Load a dataset as uint8 arrays resized to size x size, through a cache keyed by everything that
    changes its content (dataset, folder, each file's size, mtime and ctime, image size, channels, version)."""
    if name == "synthetic":
        return make_synthetic(n or 400, size, channels, seed)
    if not data_dir:
        raise UserError(f"--data {name} needs --data-dir (the folder of the archive as downloaded)")
    if not os.path.isdir(data_dir):
        found = "a file, not a folder" if os.path.exists(data_dir) else "folder not found"
        raise UserError(f"--data-dir {data_dir}: {found}; expected the folder of the {name} archive")
    entries = LISTERS[name](os.path.abspath(data_dir))
    for p in (p for e in entries for p in e[1:3] if p is not None):
        if not os.path.exists(p):
            raise UserError(f"{p}: broken symbolic link (its target {os.path.realpath(p)} is missing)")
        if not os.path.isfile(p):  # a pipe would block the decoding threads for ever
            raise UserError(f"{p}: not a regular file (a folder, a pipe or a device); expected an image file")
    # ctime too: a rewrite that keeps the size and sets the old mtime back (cp -p, rsync -t, unzip) still changes it
    stats = [(os.path.relpath(p, data_dir), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
             for st, p in ((os.stat(p), p) for e in entries for p in e[1:3] if p is not None)]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, name, os.path.abspath(data_dir), size, channels, stats]).encode()).hexdigest()
    path = os.path.join(cache_dir(), f"{name}-{size}px-{channels}ch-{key[:16]}.npz")
    k = len(entries)
    cached = _read_cache(path, [(k, channels, size, size), (k, size, size), (k,)])
    if cached is not None:
        x, y, positive, turned = cached
        if not quiet:
            print(f"data: {name} {len(entries)} samples from cache {path}")
    else:
        _cache_folder()  # before decoding: a bad $ALSEG_CACHE stops at once, not after minutes of work
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            out = list(pool.map(lambda e: _decode(e, size, channels), entries))
        x, y = np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
        positive, turned = (np.array([o[i] for o in out], dtype=bool) for i in (2, 3))
        tmp = path + f".tmp{os.getpid()}.npz"
        for old in glob.glob(glob.escape(path) + ".tmp*.npz"):  # left by a run killed mid-write (SIGKILL): a
            try:  # write takes seconds, so one an hour old is nobody's (a younger one may be another run's)
                if time.time() - os.path.getmtime(old) > 3600:
                    os.remove(old)
            except OSError:
                pass
        try:  # written whole under another name, then renamed: a run stopped midway leaves no cut cache file
            np.savez(tmp, x=x, y=y, positive=positive, turned=turned)
            os.replace(tmp, path)
        except OSError as e:  # e.g. a full disk: the data is decoded, so the run goes on
            print(f"warning: cache file {path} not written ({e.strerror}); the next run decodes the data again")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not quiet:
            print(f"data: {name} {len(entries)} samples decoded in {time.time() - t0:.1f}s, "
                  + (f"cached at {path}" if os.path.isfile(path) else "not cached"))
    if turned.any():  # a mask drawn on the turned view of a square image would pass every other check; said each run
        first = entries[int(np.argmax(turned))][1]
        print(f"note: {int(turned.sum())} images carry an EXIF orientation tag (e.g. {first}): they are read as "
              "stored, not turned as a viewer shows them, so their masks must match the stored pixels")
    check_inverted(y, data_dir)
    ids = [e[0] for e in entries]
    official = {}
    for i, e in enumerate(entries):
        if e[3]:
            official.setdefault(e[3], []).append(i)
    groups = np.array([e[4] for e in entries]) if entries[0][4] is not None else None
    return Data(x, y, ids, {k: np.array(v) for k, v in official.items()}, groups, name, positive,
                [e[1] for e in entries])


INVERTED_WARN = 0.5  # border_share at 64 px: Kvasir-SEG 1.9 %, the real samples of CVC, PH2, LGG <= 6.5 % (README)


def border_share(y):
    """The share of the non-empty masks' border pixels (first and last row and column) that are foreground."""
    y = y.reshape(len(y), *y.shape[-2:])  # a view; only the border rows and columns are copied
    edge = np.concatenate([y[:, 0], y[:, -1], y[:, :, 0], y[:, :, -1]], 1)[y.reshape(len(y), -1).any(1)]
    return float(edge.astype(bool).mean()) if len(edge) else 0.0


def check_inverted(y, data_dir):
    """Masks drawn the other way round (object black, background white) train the model on the background and
    score its Dice there, with no error: one warning line when the non-empty masks are foreground on more than
    INVERTED_WARN of their border pixels (an object seldom fills the image's edge)."""
    share = border_share(y)
    if share > INVERTED_WARN:
        print(f"warning: the masks in {data_dir} are foreground on {share:.0%} of their border pixels; expected the "
              f"object white (255 or 1) on a black background: are they inverted?")


def make_splits(data, sizes, seed):
    """Seeded (train, val, test) index arrays. Official splits are used where the dataset has them: the
    official test set, the official validation set when it covers the requested size (else validation is
    drawn from the official training set).

    Grouped data (lgg) is split by patient, never by slice, so the sizes are approximate. The patients are
    shuffled (seeded); test, then validation, is filled in that order: a patient of g samples joins a set
    holding c of its target t only if it brings the set closer to t (c + g/2 < t; a tie stays out), and a
    patient that does not is skipped, not the end: it stays free for the next set. A set with a target > 0
    that no patient brings closer gets the smallest free patient. Training gets every patient left when
    the sizes ask for all the data (sum >= N: the CEAL paper's 878 / 220 / 275 of 1373, default_split),
    else a seeded n_train of their samples (all of them if fewer). The achieved sizes are what the arrays
    hold (split_data records and prints them); only a set with a target > 0 and no patient left is an error."""
    n_train, n_val, n_test = sizes
    rng = np.random.default_rng(seed)
    n = len(data)
    if data.groups is not None:
        groups = np.unique(data.groups)
        rng.shuffle(groups)
        count = dict(zip(*np.unique(data.groups, return_counts=True)))
        free, parts = list(groups), []
        for what, target in (("test", n_test), ("validation", n_val), ("training", n_train)):
            if target > 0 and not free:
                need = sum(t > 0 for t in sizes)  # each set asked for takes at least one whole patient
                fix = "lower --split" if len(groups) >= need else (
                    f"the split is by patient, so the {need} sets asked for need at least {need} patients; "
                    f"{len(groups)} found")
                raise UserError(f"{data.name}: no patient left for the {what} set ({len(groups)} patients, {n} "
                                f"samples, split train {n_train} / val {n_val} / test {n_test}); {fix}")
            if what == "training":
                break
            part, got = [], 0
            for g in list(free):
                if 2 * (target - got) > count[g]:
                    part.append(g)
                    got += count[g]
                    free.remove(g)
            if target > 0 and not part:
                part = [min(free, key=lambda g: count[g])]
                free.remove(part[0])
            parts.append(part)
        members = lambda gs: np.flatnonzero(np.isin(data.groups, gs)).astype(np.int64)
        test, val, rest = members(parts[0]), members(parts[1]), members(free)
        train = rest if n_train + n_val + n_test >= n else rng.permutation(rest)[:n_train]
        return np.sort(train), np.sort(val), np.sort(test)
    else:
        pool = np.asarray(data.official.get("train", np.setdiff1d(np.arange(n), data.official.get("test", []))))
        if "test" in data.official:
            test = rng.permutation(data.official["test"])[:n_test]
        else:
            pool = rng.permutation(pool)
            test, pool = pool[:n_test], pool[n_test:]
        if "val" in data.official and len(data.official["val"]) >= n_val:
            val = rng.permutation(data.official["val"])[:n_val]
        else:
            pool = rng.permutation(pool)
            val, pool = pool[:n_val], pool[n_val:]
        train = rng.permutation(pool)[:n_train]
    if len(train) < n_train or len(val) < n_val or len(test) < n_test:
        raise UserError(f"{data.name}: {n} samples cannot fill the split train {n_train} / val {n_val} / test "
                        f"{n_test} (got {len(train)} / {len(val)} / {len(test)}); lower --split")
    return np.sort(train), np.sort(val), np.sort(test)


def default_split(data):
    """Split sizes for a dataset its script's paper did not use: the official test set (and validation set)
    where the dataset has them, else 20 % test and 16 % validation (the CEAL paper's LGG proportions,
    Table 2); the rest is the training pool."""
    n = len(data)
    n_test = len(data.official["test"]) if "test" in data.official else round(0.2 * n)
    n_val = len(data.official["val"]) if "val" in data.official else round(0.16 * n)
    n_train = len(data.official["train"]) if "train" in data.official else n
    if "val" not in data.official:
        n_train -= n_val
    if "test" not in data.official:
        n_train -= n_test
    return [n_train, n_val, n_test]


# ----------------------------------------------------------------------------------------------------------
# Synthetic data: lesion-like objects where selection matters
# ----------------------------------------------------------------------------------------------------------
def _smooth_noise(rng, size, cells):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.BILINEAR))


def make_synthetic(n, size=64, channels=3, seed=0):
    """Dermoscopy-like images: a skin background with uneven light, one textured lesion of irregular outline
    (varied size, contrast and colour), and the cases that make selection matter: ~6 % empty masks, ~12 %
    tiny lesions, ~20 % low contrast, hair-like lines and smooth look-alike blobs as clutter, and ~10 %
    near-duplicates (a shifted, re-noised copy of an earlier image). Deterministic from the seed."""
    rng = np.random.default_rng(seed + 7919)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    xs = np.zeros((n, 3, size, size), np.uint8)
    ys = np.zeros((n, size, size), np.uint8)
    kinds = []
    for i in range(n):
        if i > 10 and rng.random() < 0.10:  # near-duplicate of an earlier sample
            j = int(rng.integers(0, i))
            dy, dx = rng.integers(-3, 4, 2)
            img = np.roll(xs[j].astype(np.float32) / 255, (dy, dx), (1, 2))
            img += rng.normal(0, 0.02, img.shape).astype(np.float32)
            xs[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
            ys[i] = np.roll(ys[j], (dy, dx), (0, 1))
            kinds.append("duplicate")
            continue
        skin = np.array([0.85, 0.65, 0.55]) * rng.uniform(0.75, 1.05) + rng.normal(0, 0.04, 3)
        light = 1 + 0.25 * _smooth_noise(rng, size, 2) + 0.15 * (xx - 0.5) * rng.normal()
        img = skin[:, None, None] * light[None] * (1 + 0.05 * _smooth_noise(rng, size, 8))[None]
        u = rng.random()
        kind = "empty" if u < 0.06 else "tiny" if u < 0.18 else "low-contrast" if u < 0.38 else "normal"
        mask = np.zeros((size, size), bool)
        if kind != "empty":
            r0 = rng.uniform(0.025, 0.05) if kind == "tiny" else float(np.clip(rng.lognormal(-1.9, 0.45), 0.06, 0.38))
            cy, cx = rng.uniform(0.2, 0.8, 2)
            theta = np.arctan2(yy - cy, xx - cx)
            radius = r0 * (1 + sum(rng.uniform(0, 0.25 / k) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in range(2, 6)))
            mask = np.hypot(yy - cy, xx - cx) < radius
            contrast = rng.uniform(0.06, 0.14) if kind == "low-contrast" else rng.uniform(0.2, 0.55)
            colour = np.array([0.45, 0.28, 0.18]) + rng.normal(0, 0.05, 3)
            texture = 1 + 0.35 * _smooth_noise(rng, size, 12) + 0.15 * _smooth_noise(rng, size, 24)
            alpha = contrast * mask * texture
            img = img * (1 - alpha[None]) + colour[:, None, None] * alpha[None] * img.mean()
        for _ in range(rng.poisson(1.0) if rng.random() < 0.35 else 0):  # smooth look-alike blobs (no texture)
            by, bx, br = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.02, 0.08)
            blob = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * br ** 2))
            img = img * (1 - rng.uniform(0.15, 0.4) * blob[None] * np.array([0.6, 1.0, 1.0])[:, None, None])
        if rng.random() < 0.3:  # hair-like dark lines
            pil = Image.new("L", (size, size))
            draw = ImageDraw.Draw(pil)
            for _ in range(rng.integers(1, 6)):
                pts = rng.uniform(0, size, 4)
                draw.line([pts[0], pts[1], pts[2], pts[3]], fill=255, width=max(1, size // 96))
            hair = np.asarray(pil, np.float32) / 255
            img = img * (1 - 0.7 * hair[None])
        img = img + rng.normal(0, rng.uniform(0.015, 0.05), img.shape)
        xs[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
        ys[i] = mask
        kinds.append(kind)
    if channels == 1:
        xs = np.round(xs.astype(np.float32).mean(1, keepdims=True)).astype(np.uint8)
    data = Data(xs, ys, [f"syn{i:05d}" for i in range(n)], {}, None, "synthetic")
    data.kinds = kinds
    return data
