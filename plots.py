"""Figures with Pillow only: a few plain charts (line with std bands, scatter, bar, histogram) and an image
panel, and the sheet of a round's picks. common.py re-exports them (common.plot, common.plot_hist,
common.save_panel).
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (152, 223, 138), (174, 199, 232)]


def _ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [t for t in np.arange(math.ceil(lo / step) * step, hi + step / 2, step) if lo - 1e-9 <= t <= hi + 1e-9]


def _fmt(v, ticks):
    """A tick label with as many decimals as the ticks' step needs (0.2166, 0.2168, ... stay apart)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    dec = max(0, -math.floor(math.log10(step) + 1e-9))
    dec += abs(step * 10 ** dec - round(step * 10 ** dec)) > 1e-6  # 0.25, 2.5: one more
    return f"{v:.{dec}f}"


def plot(path, series, xlabel="", ylabel="", title="", kind="line", size=(640, 440), dashed=()):
    """series: {label: (xs, ys) or (xs, ys, stds)}; kind "line" (with ±std bands), "scatter" or "bar"; the
    lines of the labels in `dashed` are drawn dashed (e.g. a ceiling)."""
    font = ImageFont.load_default()
    labels = [str(label)[:48] for label in series]  # the legend, right of the plot
    legend_w = int(max((font.getlength(t) for t in labels), default=0)) + 30 if labels else 0
    W, H = size[0] + legend_w, size[1]
    L, R, T, B = 64, 16 + legend_w, 30, 48
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    xs_all = np.concatenate([np.asarray(s[0], float) for s in series.values()] or [np.zeros(1)])
    ys_all = np.concatenate([np.asarray(s[1], float) - (np.asarray(s[2]) if len(s) > 2 else 0) for s in series.values()] +
                            [np.asarray(s[1], float) + (np.asarray(s[2]) if len(s) > 2 else 0) for s in series.values()] or [np.zeros(1)])
    finite = np.isfinite(ys_all)
    x0, x1 = (xs_all.min(), xs_all.max()) if len(xs_all) else (0, 1)
    y0, y1 = (ys_all[finite].min(), ys_all[finite].max()) if finite.any() else (0, 1)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)
    py = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    ticks = _ticks(x0, x1)
    for t in ticks:
        d.line([px(t), H - B, px(t), H - B + 4], fill="black")
        d.text((px(t) - 8, H - B + 6), _fmt(t, ticks), fill="black", font=font)
    ticks = _ticks(y0, y1)
    for t in ticks:
        d.line([L - 4, py(t), L, py(t)], fill="black")
        d.line([L, py(t), W - R, py(t)], fill=(0, 0, 0, 25))
        d.text((4, py(t) - 5), _fmt(t, ticks), fill="black", font=font)
    d.text((L + (W - L - R) // 2 - 3 * len(xlabel), H - 20), xlabel, fill="black", font=font)
    d.text((4, 8), (ylabel + "  " if ylabel else "") + title, fill="black", font=font)
    for k, (label, s) in enumerate(series.items()):
        c = COLOURS[k % len(COLOURS)]
        xs, ys = np.asarray(s[0], float), np.asarray(s[1], float)
        if kind == "bar":
            bw = max(1.0, (px(xs[1]) - px(xs[0])) * 0.9) if len(xs) > 1 else 6
            for x, y in zip(xs, ys):
                d.rectangle([px(x) - bw / 2, py(y), px(x) + bw / 2, py(max(y0, 0))], fill=c + (150,))
        elif kind == "scatter":
            for x, y in zip(xs, ys):
                d.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=c + (160,))
        else:
            if len(s) > 2 and len(xs) > 1:
                sd = np.asarray(s[2], float)
                poly = [(px(x), py(y + e)) for x, y, e in zip(xs, ys, sd)] + \
                       [(px(x), py(y - e)) for x, y, e in zip(xs[::-1], ys[::-1], sd[::-1])]
                d.polygon(poly, fill=c + (50,))
            pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
            if len(pts) > 1 and label in dashed:  # 6 px on, 4 off, along each segment
                for (ax, ay), (bx, by) in zip(pts, pts[1:]):
                    n = max(1, int(math.hypot(bx - ax, by - ay) // 10))
                    for j in range(n):
                        f0, f1 = j / n, (j + 0.6) / n
                        d.line([ax + f0 * (bx - ax), ay + f0 * (by - ay), ax + f1 * (bx - ax), ay + f1 * (by - ay)],
                               fill=c, width=2)
            elif len(pts) > 1:
                d.line(pts, fill=c, width=2)
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
    lx = W - R + 10
    for k, label in enumerate(labels):
        d.rectangle([lx, T + 6 + 14 * k, lx + 10, T + 14 + 14 * k], fill=COLOURS[k % len(COLOURS)])
        d.text((lx + 14, T + 4 + 14 * k), label, fill="black", font=font)
    img.save(path)


def learning_curve(path, rows, label, title):
    """Test Dice (mean ± std) against labelled samples, from rounds.csv's rows."""
    xs = [int(r["labeled"]) for r in rows]
    plot(path, {label: (xs, [float(r["dice_mean"]) for r in rows], [float(r["dice_std"]) for r in rows])},
         xlabel="labelled samples", ylabel="test Dice", title=title)


def plot_hist(path, values, bins=80, xlabel="", title="", marks=None):
    """Histogram; marks {label: values} draws those samples as ticks under the bars (e.g. the selected)."""
    values = np.asarray(values, float)
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    plot(path, {"pool": (centres, counts)}, xlabel, "count", title, kind="bar")
    if not marks or len(values) == 0:
        return
    img = Image.open(path).convert("RGB")
    d = ImageDraw.Draw(img)
    # plot()'s geometry: its right margin R holds the legend ("pool"), and its x range is the bar centres'
    legend_w = int(ImageFont.load_default().getlength("pool")) + 30
    (W, H), L, R, B = img.size, 64, 16 + legend_w, 48
    lo, hi = centres.min(), centres.max()
    lo, hi = (lo, hi) if hi > lo else (lo - 1, hi + 1)
    for k, (label, v) in enumerate(marks.items()):
        col = COLOURS[(k + 1) % len(COLOURS)]
        for u in np.asarray(v, float):  # a score half a bin beyond the outer centres stays on the frame
            x = min(max(L + (u - lo) / (hi - lo) * (W - L - R), L), W - R)
            d.line([x, H - B - 6, x, H - B - 1], fill=col, width=2)
        d.rectangle([W - R - 150, 30 + 20 + 14 * k, W - R - 140, 30 + 28 + 14 * k], fill=col)
        d.text((W - R - 136, 30 + 18 + 14 * k), f"{label} (ticks)", fill="black")
    img.save(path)


def save_panel(path, images, columns, titles):
    """Rows of tiles; images: list of rows, each a list of (H, W) or (C, H, W) arrays (floats in [0, 1] or
    uint8). Used for the image / ground truth / prediction / uncertainty panel. No rows (nothing to show,
    e.g. no test set): no file."""
    if not len(images):
        return
    tiles = []
    for row in images:
        out = []
        for a in row:
            a = np.asarray(a, dtype=np.float32)
            if a.ndim == 3:
                a = a.transpose(1, 2, 0) if a.shape[0] in (1, 3) else a
                a = a[..., 0] if a.shape[-1] == 1 else a
            if a.max() > 1.0:
                a = a / 255.0
            elif a.ndim == 2 and a.max() > 0 and a.max() < 0.5:  # uncertainty maps: stretch for visibility
                a = a / a.max()
            out.append(Image.fromarray(np.clip(a * 255, 0, 255).astype(np.uint8)).convert("RGB"))
        tiles.append(out)
    s = max(64, max(t.size[0] for r in tiles for t in r))
    img = Image.new("RGB", (columns * (s + 4) + 4, len(tiles) * (s + 4) + 20), "white")
    d = ImageDraw.Draw(img)
    for c, t in enumerate(titles):
        d.text((4 + c * (s + 4), 4), t, fill="black")
    for r, row in enumerate(tiles):
        for c, t in enumerate(row):
            img.paste(t.resize((s, s), Image.NEAREST), (4 + c * (s + 4), 18 + r * (s + 4)))
    img.save(path)


def picks_sheet(path, data, rows, probs, groups, scores, tile=72):
    """common.save_picks's sheet: per row (how, data index) the image, its mask and the model's prediction
    (probs > 0.5), and a caption: the group (coloured as `groups` orders them), the id, the score, fg shares."""
    font = ImageFont.load_default()
    cap_w = 140
    img = Image.new("RGB", (cap_w + 3 * (tile + 4) + 4, 18 + len(rows) * (tile + 4)), "white")
    d = ImageDraw.Draw(img)
    for c, t in enumerate(["image", "ground truth", "prediction"]):
        d.text((cap_w + 4 + c * (tile + 4), 4), t, fill="black", font=font)
    for r, ((how, i), p) in enumerate(zip(rows, probs)):
        im = data.x[i]
        im = im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)
        tiles = [Image.fromarray(im), Image.fromarray(data.y[i] * 255), Image.fromarray((p > 0.5).astype(np.uint8) * 255)]
        y0 = 18 + r * (tile + 4)
        for c, t in enumerate(tiles):
            img.paste(t.convert("RGB").resize((tile, tile), Image.NEAREST), (cap_w + 4 + c * (tile + 4), y0))
        s = None if scores is None else scores.get(i)
        fg = f"fg {float(data.y[i].mean()):.0%} / pred {float((p > 0.5).mean()):.0%}"
        d.text((4, y0 + 4), f"{how}", fill=COLOURS[groups.index(how) % len(COLOURS)], font=font)
        d.text((4, y0 + 18), str(data.ids[i])[:22], fill="black", font=font)  # what fits the caption column
        d.text((4, y0 + 32), "" if s is None else f"score {float(s):.5g}", fill="black", font=font)
        d.text((4, y0 + 46), fg, fill="black", font=font)
    img.save(path)
