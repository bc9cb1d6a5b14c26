"""Speed benchmark: the project's fast paths against the naive ones, side by side in one run, on the same
synthetic data (common.make_synthetic), with medians over repeats and ratios ours / naive.

What is compared (docs/speed.md explains each line):
  1. a training epoch: common.train (data resident on the device as uint8, batches gathered by index) vs a
     plain Dataset + DataLoader loop that converts each sample from NumPy and copies batches to the device;
  2. MC-dropout scoring of a pool at T = 20: common.mc_dropout vs T separate full forward passes, for dropout
     at the bottleneck only (the public CEAL code) and dropout in every block (the CEAL paper);
  3. features for K-means (ssl_coldstart.py): ssl_coldstart.pooled_features (batched) vs one sample at a time.
It also prints images/s, model FLOPs per image (torch.utils.flop_counter), achieved GFLOP/s, on a GPU the
fraction of the bf16 peak and an estimate of the full CEAL ISIC-2017 protocol, and peak memory.

  python benchmarks/speed.py --quick          # about a minute on 2 idle cores
  python benchmarks/speed.py                  # the numbers in docs/speed.md (CPU, 1 and 2 threads)
  python benchmarks/speed.py --device cuda --amp --compile   # GPU: bf16, channels_last (CUDA only), torch.compile
"""
import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import runfolder  # noqa: E402
import ssl_coldstart  # noqa: E402
from unet import UNet  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' spec sheets (TFLOP/s, without sparsity); --peak-tflops overrides.
BF16_PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("GH200", 989),
                    ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10", 125), ("RTX 4090", 165)]

# (name, width, image size, images, batch size) per setting; "cpu-default" is ceal_mcdropout.py's synthetic row.
CONFIGS = {
    "cpu": dict(train=[("tiny", 8, 32, 128, 16), ("cpu-default", 16, 64, 64, 16), ("larger", 16, 128, 16, 8)],
                mc=[("cpu-default", 16, 64, 16, 16)], feats=[("cpu-default", 16, 64, 64, 16)]),
    "cpu-quick": dict(train=[("tiny", 8, 32, 64, 16), ("cpu-default", 16, 64, 32, 16)],
                      mc=[("cpu-default", 16, 64, 8, 8)], feats=[("cpu-default", 16, 64, 32, 16)]),
    "cuda": dict(train=[("cpu-default", 16, 64, 512, 16), ("isic-paper", 64, 256, 256, 32)],
                 mc=[("cpu-default", 16, 64, 256, 16), ("isic-paper", 64, 256, 128, 32)],
                 feats=[("isic-paper", 64, 256, 256, 32)]),
    "cuda-quick": dict(train=[("isic-paper", 64, 256, 128, 32)], mc=[("isic-paper", 64, 256, 64, 32)],
                       feats=[("isic-paper", 64, 256, 128, 32)]),
    "smoke": dict(train=[("smoke", 4, 16, 16, 8)], mc=[("smoke", 4, 16, 8, 4)], feats=[("smoke", 4, 16, 8, 4)]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda (default: auto)")
    p.add_argument("--quick", action="store_true", help="smaller sets, 3 repeats, 1 thread unless --threads: about a "
                   "minute on 2 idle cores")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement, median reported (default: 5; quick 3)")
    p.add_argument("--threads", help="CPU thread counts to measure, comma-separated (default: 1,2; quick 1)")
    p.add_argument("--mc-passes", type=int, default=20, help="T for MC dropout (default: 20, the reference code's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as --amp in the scripts (default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models, as --compile in the scripts")
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the GPU for the fraction of peak "
                   "(default: from a table of spec-sheet values, e.g. 989 for H100/H200 SXM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and models (default: 0)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny sizes, 1 repeat
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    args.threads = args.threads or ("1" if args.quick or args.smoke else "1,2")
    return args


# ----------------------------------------------------------------------------------------------------------
# The naive paths: what the public reference code does
# ----------------------------------------------------------------------------------------------------------
class NumpySegDataset(torch.utils.data.Dataset):
    """One sample at a time from the NumPy arrays, converted to float in __getitem__."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i].astype(np.float32) / 255), torch.from_numpy(self.y[i].astype(np.float32))


def naive_loader(data, idx, batch_size, generator=None, order=None):
    """DataLoader over NumpySegDataset: shuffled, or the given batches (lists of indices) when `order` is set."""
    ds = NumpySegDataset(data.x, data.y)
    if order is not None:
        return torch.utils.data.DataLoader(ds, batch_sampler=order, generator=torch.Generator())
    sampler = torch.utils.data.SubsetRandomSampler(list(np.asarray(idx)), generator=generator)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, generator=torch.Generator())


def naive_train_epoch(model, opt, loader, device, amp=False, loss_fn=common.bce_dice_loss):
    """One epoch of the plain loop: batches copied to the device, loss.item() every step."""
    model.train()
    total, n = 0.0, 0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        with common.autocast(device, amp):
            loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(xb)
        n += len(xb)
    return total / max(1, n)


@torch.inference_mode()
def naive_mc_dropout(model, x, idx, T, batch_size, device, amp=False):
    """T separate full forward passes per batch (dropout on, BatchNorm in eval); yields (indices, mean, var)."""
    common.enable_mc_dropout(model)
    idx = torch.as_tensor(np.asarray(idx), device=device, dtype=torch.long)
    for b in common.batches(idx, batch_size):
        xb = common.to_input(x[b])
        s1 = torch.zeros((len(b),) + tuple(x.shape[-2:]), device=device)
        s2 = torch.zeros_like(s1)
        for _ in range(T):
            with common.autocast(device, amp):
                out = model(xb)
            p = torch.sigmoid((out[0] if isinstance(out, tuple) else out).float()[:, 0])
            s1 += p
            s2 += p * p
        mean = s1 / T
        yield b, mean, (s2 / T - mean * mean).clamp_(min=0)
    model.eval()


@torch.inference_mode()
def naive_features(model, x, idx, device, amp=False, grid=1):
    """Last encoder stage features, pooled, one sample at a time."""
    model.eval()
    out = []
    for i in np.asarray(idx):
        with common.autocast(device, amp):
            f = model.features(common.to_input(x[int(i): int(i) + 1]))
        out.append(F.adaptive_avg_pool2d(f.float(), grid).flatten(1).cpu())
    return torch.cat(out)


class PlainDecodeUNet(UNet):
    """The same U-Net with decode() overridden (unchanged maths): mc_dropout then runs the encoder once and
    the whole decoder T times, without splitting off the skip connections' share (for the comparison)."""

    def decode(self, feats):
        return super().decode(feats)


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(fns, repeats, device):
    """Median seconds of each function, warm-up first, the functions interleaved in every repeat so that
    load from other jobs falls on all of them alike, and their order rotated from one repeat to the next so
    that none is always first (or always follows the same one)."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def model_flops(width, size, batch=2):
    """(forward, forward + backward) FLOPs of the plain U-Net (3 -> 1 channels) per image."""
    m = UNet(3, 1, width).to("meta")  # shapes only: instant at any size
    x = torch.rand(batch, 3, size, size, device="meta")
    fwd = count_flops(lambda: m(x)) / batch
    both = count_flops(lambda: m(x).sum().backward()) / batch
    return fwd, both


def mc_flops_per_image(width, size, T, dropout_at):
    """FLOPs per pool image of common.mc_dropout (looped, encoder once where it applies), on meta tensors."""
    meta = torch.device("meta")
    m = UNet(3, 1, width, dropout=0.5, dropout_at=dropout_at).to(meta)
    x = torch.zeros(2, 3, size, size, dtype=torch.uint8, device=meta)
    return count_flops(lambda: drain(common.mc_dropout(m, x, np.arange(2), T, 2, meta, batched=False))) / 2


def new_model(width, device, args, dropout=0.2, dropout_at="every", cls=UNet, seed=0, prepared=True):
    """Ours: common.prepare_model (its memory format, common.memory_format: channels_last on CUDA, the default
    layout on the CPU; optional compile). Naive (prepared=False): .to(device), as the reference code does. On
    the CPU without --compile the two are the same model. The same seed gives the same initial weights."""
    torch.manual_seed(seed)
    m = cls(3, 1, width, dropout=dropout, dropout_at=dropout_at)
    return common.prepare_model(m, device, args.compile) if prepared else m.to(device)


def fresh_stats(model, x, device):
    """BatchNorm running statistics from a few real batches, so that eval-mode BN is not ~identity."""
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model(common.to_input(x[:16]))
    model.eval()


def drain(gen):
    for _ in gen:
        pass


def rss_now():
    """Current resident set size in bytes (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def gpu_peak(device, override):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops} TFLOP/s dense bf16 ({key} spec sheet)"
    return None, f"unknown for {name}: pass --peak-tflops"


TRAIN_COLS, MC_COLS, FEAT_COLS = (12, 11, 6, 8, 8, 10, 9, 7, 9, 8), (16, 34, 8, 7, 7, 9, 10), (12, 11, 6, 8, 8, 10, 7)


def row(*cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


# ----------------------------------------------------------------------------------------------------------
# The three comparisons
# ----------------------------------------------------------------------------------------------------------
def bench_train(cfg, data, args, device, peak):
    """Three loops, each with its own model and Adam from the same initial weights: ours, the naive loop on a
    plain model (the reference code), and the naive loop on our prepared model (isolates the data path; on the
    CPU the prepared model is the plain one, so the two naive loops differ only by noise)."""
    name, width, size, n, bs = cfg
    x, y = common.to_device(data, device)
    idx = np.arange(n)
    models = {"ours": new_model(width, device, args), "naive": new_model(width, device, args, prepared=False),
              "naive_nhwc": new_model(width, device, args)}
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()}
    gen = torch.Generator().manual_seed(args.seed)
    loader = naive_loader(data, idx, bs, torch.Generator().manual_seed(args.seed))
    fns = {"ours": lambda: common.train(models["ours"], opts["ours"], x, y, idx, 1, bs, device=device, amp=args.amp,
                                        generator=gen)}
    for k in ("naive", "naive_nhwc"):
        fns[k] = lambda k=k: naive_train_epoch(models[k], opts[k], loader, device, args.amp)
    t = side_by_side(fns, args.repeats, device)
    _, fb = model_flops(width, size)
    ips = n / t["ours"]
    frac = f"{fb * ips / peak:.1%}" if peak else "-"
    print(row(name, f"w{width} {size}px", n, f"{t['ours']:.3f}", f"{t['naive']:.3f}", f"{t['naive_nhwc']:.3f}",
              f"{ips:.1f}", f"{t['naive'] / t['ours']:.2f}x", f"{t['naive_nhwc'] / t['ours']:.2f}x",
              f"{fb * ips / 1e9:.1f}", widths=TRAIN_COLS) + f"  {frac}", flush=True)
    return {"train_ips": ips, "ratio": t["naive"] / t["ours"], "ratio_data_path": t["naive_nhwc"] / t["ours"]}


def bench_mc(cfg, data, args, device, peak, measure_both):
    """Per dropout placement: T full forwards on a plain model (the reference code) and on our prepared model,
    common.mc_dropout's automatic choice, the other batching choice, and (bottleneck) encoder once without
    the skip split. Same weights and BatchNorm statistics in every model."""
    name, width, size, n, bs = cfg
    T = args.mc_passes
    x, _ = common.to_device(data, device)
    idx = np.arange(n)
    fwd, _ = model_flops(width, size)
    auto = "batched" if device.type == "cuda" else "looped"
    results = {}
    for at, p in (("bottleneck", 0.5), ("every", 0.2)):  # public CEAL code: 0.5 at the bottleneck; ours: 0.2 every block
        model = new_model(width, device, args, p, at)
        fresh_stats(model, x, device)
        plain = new_model(width, device, args, p, at, prepared=False)
        plain.load_state_dict(model.state_dict())
        paths = {"naive": ("T full forwards (plain model)",
                           lambda: drain(naive_mc_dropout(plain, x, idx, T, bs, device, args.amp))),
                 "naive_nhwc": ("T full forwards (our model prep)",
                                lambda: drain(naive_mc_dropout(model, x, idx, T, bs, device, args.amp))),
                 "ours": (f"ours (auto: {'encoder once, ' if at == 'bottleneck' else ''}{auto})",
                          lambda: drain(common.mc_dropout(model, x, idx, T, bs, device, args.amp)))}
        if measure_both:  # the other choice of batching, measured too
            other = device.type != "cuda"
            paths["other"] = (f"ours, {'batched' if other else 'looped'}",
                              lambda: drain(common.mc_dropout(model, x, idx, T, bs, device, args.amp, batched=other)))
        if at == "bottleneck":
            nosplit = new_model(width, device, args, p, at, cls=PlainDecodeUNet)
            nosplit.load_state_dict(model.state_dict())
            paths["nosplit"] = (f"encoder once, no skip split, {auto}",
                                lambda: drain(common.mc_dropout(nosplit, x, idx, T, bs, device, args.amp)))
        t = side_by_side({k: fn for k, (_, fn) in paths.items()}, args.repeats, device)
        b0 = min(bs, n)  # FLOPs of one batch of each path (on the uncompiled twin: the same arithmetic)
        flops = {"naive": T * fwd * b0, "naive_nhwc": T * fwd * b0,
                 "ours": count_flops(lambda: drain(common.mc_dropout(plain, x, idx[:b0], T, b0, device)))}
        flops["other"] = flops["ours"]
        if at == "bottleneck":
            flops["nosplit"] = count_flops(lambda: drain(common.mc_dropout(nosplit, x, idx[:b0], T, b0, device)))
        for k, (label, _) in paths.items():
            ips = n / t[k]
            frac = f"{flops[k] / b0 * ips / peak:.1%}" if peak else "-"
            print(row(f"{at} p={p}", label[:36], f"{t[k]:.3f}", f"{ips:.2f}", f"{t['naive'] / t[k]:.2f}x",
                      f"{t['naive_nhwc'] / t[k]:.2f}x", f"{flops['naive'] / flops[k]:.2f}x", widths=MC_COLS)
                  + f"  {frac}", flush=True)
        results[at] = {"ratio": t["naive"] / t["ours"], "ratio_same_prep": t["naive_nhwc"] / t["ours"],
                       "sec_per_image": t["ours"] / n}
    return results


def bench_features(cfg, data, args, device):
    name, width, size, n, bs = cfg
    x, _ = common.to_device(data, device)
    idx = np.arange(n)
    model = new_model(width, device, args)
    fresh_stats(model, x, device)
    t = side_by_side({"ours": lambda: ssl_coldstart.pooled_features(model, x, idx, bs, device, args.amp),
                      "naive": lambda: naive_features(model, x, idx, device, args.amp)}, args.repeats, device)
    print(row(name, f"w{width} {size}px", n, f"{t['ours']:.3f}", f"{t['naive']:.3f}", f"{n / t['ours']:.1f}",
              f"{t['naive'] / t['ours']:.2f}x", widths=FEAT_COLS), flush=True)
    return {"ratio": t["naive"] / t["ours"]}


def ceal_isic_counts(T=20):
    """Work of ceal_mcdropout.py --data isic2017 with its defaults (its DEFAULTS row: Table 1 split 1600/400/600,
    600 labelled, 10 rounds, T = 20; each round 35 queried and 20 more pseudo-labelled (--pseudo-mode total), all
    leaving the pool of 1000; 20 epochs initially and 5 per round, each epoch validated on the 400), following
    its loop: it trains on the labelled and the pseudo-labelled, and scores the whole pool each round."""
    labeled, pseudo, pool, val, test = 600, 0, 1000, 400, 600
    train_steps, mc_images, eval_images = 20 * labeled, 0, 20 * val + val + test
    for rnd in range(1, 11):
        mc_images += pool
        labeled, pseudo, pool = labeled + 35, pseudo + 20, pool - 35 - 20
        train_steps += 5 * (labeled + pseudo)
        eval_images += 5 * val + val + test
    return train_steps, mc_images, mc_images * T, eval_images


def main(argv=None):
    args = parse_args(argv)
    device = common.get_device(args.device)
    kind = "smoke" if args.smoke else device.type + ("-quick" if args.quick else "") if device.type == "cuda" else \
        "cpu-quick" if args.quick else "cpu"
    cfgs = CONFIGS[kind]
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    if device.type == "cuda" and not args.smoke:
        torch.backends.cudnn.benchmark = True  # as common.seed_everything does outside --deterministic
    peak, peak_txt = gpu_peak(device, args.peak_tflops)
    t_start = time.time()
    name = runfolder.device_name(device)
    print(f"speed benchmark: torch {torch.__version__}, device {device} ({name}), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, amp {args.amp}, "
          f"compile {args.compile}, repeats {args.repeats} (median), T = {args.mc_passes}")
    fmt = common.memory_format(device)
    print(f"memory format of our prepared models and batches (common.memory_format): {fmt}" +
          ("" if fmt == torch.channels_last else "; the same as the plain model's, so 'our model prep' and "
           "'naive prep' differ from the plain/naive lines only by noise (and --compile)"))
    if device.type == "cuda":
        print(f"GPU peak used for the fraction of peak: {peak_txt}")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other jobs share the cores, so "
              f"absolute times are inflated, and with several threads each op waits at OpenMP barriers for a "
              f"descheduled thread; the interleaved ratios are the numbers to read")
    print("ratios are naive time / our time (> 1: ours faster); every pair is timed interleaved in one run\n")

    sizes = {c[1:3] for group in cfgs.values() for c in group} | {(64, 256)}  # + the CEAL paper's model
    print("model FLOPs per image (torch.utils.flop_counter, plain U-Net 3 -> 1 channels):")
    for width, size in sorted(sizes, key=lambda s: (s[1], s[0])):
        fwd, both = model_flops(width, size)
        print(f"  width {width:3d} at {size}x{size}: forward {fwd / 1e9:7.3f} GFLOP, "
              f"forward + backward {both / 1e9:7.3f} GFLOP")
    T = args.mc_passes
    fwd, both = model_flops(64, 256)
    split = mc_flops_per_image(64, 256, T, "bottleneck")
    steps, pool_images, passes, evals = ceal_isic_counts(T)
    work = {"training": steps * both, "MC scoring (dropout every block)": passes * fwd, "evaluation": evals * fwd}
    print(f"CEAL ISIC-2017 protocol (ceal_mcdropout.py --data isic2017, width 64, 256 px): {steps} training "
          f"image-steps, {pool_images} pool images x T = {T} = {passes} MC passes, {evals} evaluated images = "
          + ", ".join(f"{k} {v / 1e15:.2f}" for k, v in work.items()) + f" PFLOP; total {sum(work.values()) / 1e15:.1f} "
          f"PFLOP = {sum(work.values()) / 989e12:.0f} s at 989 TFLOP/s (H100/H200 SXM dense bf16) if every FLOP ran "
          f"at peak. With bottleneck dropout ours scores a pool image in {split / 1e9:.0f} GFLOP instead of "
          f"{T * fwd / 1e9:.0f} (T full forwards): {T * fwd / split:.2f}x less, MC scoring "
          f"{pool_images * split / 1e15:.2f} PFLOP")
    datasets = {}

    def data_for(size, n):
        key = (size, max(n, 16))
        if key not in datasets:
            datasets[key] = common.make_synthetic(key[1], size, 3, args.seed)
        return datasets[key]

    summary = {}
    for nt in threads:
        if device.type == "cpu":
            torch.set_num_threads(nt)
        print(f"\n==== {nt} thread{'s' if nt > 1 else ''} ====" if device.type == "cpu" else "")
        print("training epoch: ours = common.prepare_model + common.train (device-resident uint8, batches gathered by "
              "index);\nnaive = plain model + Dataset/DataLoader (per-sample NumPy -> float, batch copied to the device, "
              "loss.item() per step);\nnaive prep = the naive loop on our prepared model; ratio = naive / ours; "
              "data path = naive prep / ours")
        print(row("set", "model", "images", "ours s", "naive s", "naive prep", "ours im/s", "ratio", "data path",
                  "GFLOP/s", widths=TRAIN_COLS) + "  of peak")
        for cfg in cfgs["train"]:
            summary[(nt, "train", cfg[0])] = bench_train(cfg, data_for(cfg[2], cfg[3]), args, device, peak)
        print(f"\nMC-dropout scoring of a pool, T = {args.mc_passes}: im/s = pool images scored per second; ratio = "
              f"naive (plain model) / path;\nsame prep = T full forwards on our prepared model / path; FLOP ratio = "
              f"arithmetic of T full forwards / path (torch.utils.flop_counter)")
        for cfg in cfgs["mc"]:
            print(f"[{cfg[0]}: width {cfg[1]}, {cfg[2]}px, pool {cfg[3]}, batch {cfg[4]}]")
            print(row("dropout", "path", "s", "im/s", "ratio", "same prep", "FLOP ratio", widths=MC_COLS) + "  of peak")
            summary[(nt, "mc", cfg[0])] = bench_mc(cfg, data_for(cfg[2], cfg[3]), args, device, peak,
                                                   measure_both=device.type == "cpu" or not args.quick)
        print("\nfeatures for K-means (last encoder stage, pooled 1x1): ours = ssl_coldstart.pooled_features "
              "(batched); naive = one sample at a time")
        print(row("set", "model", "images", "ours s", "naive s", "ours im/s", "ratio", widths=FEAT_COLS))
        for cfg in cfgs["feats"]:
            summary[(nt, "feats", cfg[0])] = bench_features(cfg, data_for(cfg[2], cfg[3]), args, device)

    if (threads[0], "mc", "isic-paper") in summary and (threads[0], "train", "isic-paper") in summary:
        tr, mc = summary[(threads[0], "train", "isic-paper")], summary[(threads[0], "mc", "isic-paper")]
        steps, pool_images, passes, evals = ceal_isic_counts(args.mc_passes)
        model = new_model(64, device, args)
        x, _ = common.to_device(data_for(256, 64), device)
        ev = side_by_side({"eval": lambda: common.predict(model, x, np.arange(64), 32, device, args.amp)},
                          args.repeats, device)
        est = {"train": steps / tr["train_ips"], "MC scoring": pool_images * mc["every"]["sec_per_image"],
               "evaluation": evals * ev["eval"] / 64}
        print(f"\nCEAL ISIC-2017 protocol estimate (an estimate from the rates above, not a timed run): {steps} training "
              f"image-steps, {pool_images} pool images x T = {passes} MC passes (dropout in every block), {evals} "
              f"evaluated images: " + ", ".join(f"{k} {v:.0f}s" for k, v in est.items()) +
              f"; total {sum(est.values()) / 60:.1f} min (bottleneck-only dropout: MC scoring "
              f"{pool_images * mc['bottleneck']['sec_per_image']:.0f}s)")

    print("\nmemory")
    print(f"  peak host memory of the measurements above (getrusage ru_maxrss): {peak_rss() / 2 ** 30:.2f} GiB")
    if device.type == "cuda":
        print(f"  peak device memory (torch.cuda.max_memory_allocated): "
              f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    d = common.make_synthetic(8, 256, 3, args.seed)
    per_image = (d.x.nbytes + d.y.nbytes) / len(d)
    n_alloc = 26 if args.smoke else 2600  # smoke (tests): 1/100 of the set, scaled up
    before = rss_now()
    xs = np.full((n_alloc, 3, 256, 256), 1, np.uint8)  # np.full writes every page: resident, not just reserved
    ys = np.full((n_alloc, 256, 256), 1, np.uint8)
    grown = (rss_now() - before) * 2600 / n_alloc
    print(f"  ISIC-2017-sized set, 2600 images at 256x256 as cached uint8: make_synthetic(8, 256) holds "
          f"{per_image / 2 ** 10:.0f} KiB per image (3 x 256 x 256 image + 256 x 256 mask) -> x 2600 = "
          f"{per_image * 2600 / 2 ** 30:.3f} GiB; allocating {n_alloc} images' uint8 arrays grew the resident set by "
          f"{'' if n_alloc == 2600 else f'(x {2600 // n_alloc}) '}"
          f"{grown / 2 ** 30:.3f} GiB ({'under' if max(grown, per_image * 2600) < 2 * 2 ** 30 else 'NOT under'} 2 GiB)")
    del xs, ys
    print(f"  peak host memory with that set allocated (ru_maxrss): {peak_rss() / 2 ** 30:.2f} GiB")
    print(f"\ndone in {time.time() - t_start:.0f}s (load average {os.getloadavg()[0]:.1f} at the end)")
    return summary


if __name__ == "__main__":
    common.run_main(main)
