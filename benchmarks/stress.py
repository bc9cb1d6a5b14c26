"""Stress run for issue 12: native crashes on the CPU (docs/cpu_channels_last_crash.md). Not a test: it counts.

Two parts, every run in a fresh subprocess, counting exits other than 0 (a negative code is a signal: -6
SIGABRT from glibc's heap checks, -11 SIGSEGV):
  repro    the issue's reproducer (backward of a 1x1, stride-2 convolution, 4 input channels, 200 times) at 1
           and 2 threads, in the memory format the project uses on the CPU now (common.memory_format(cpu));
           --channels-last forces the old trigger, to show that the detector detects.
  scripts  every script, --repeats times per width, on a tiny dataset (the Kvasir-SEG real samples at
           ../shared/data/real-samples/Kvasir-SEG when present, else a synthetic folder of 24 images), with
           flags that make a run take seconds.
Optionally (--valgrind K) the reproducer under valgrind, K runs per memory format, counting the runs whose
valgrind log shows an invalid write in oneDNN (dnnl or unnamed JIT) frames: a detector that does not depend on
glibc noticing the damage.

The buggy kernel is oneDNN's AVX2 1x1 convolution backward-weights (jit_avx2_1x1_convolution_bwd_weights_t).
On a CPU with AVX-512 oneDNN picks its AVX-512 kernels instead and the reproducer does not crash, so by default
every child runs with ONEDNN_MAX_CPU_ISA=AVX2: the kernels of an AVX2-only machine (the issue author's), the
worst case. --isa native leaves oneDNN's choice alone.

  python benchmarks/stress.py                                    # 30 + 30 reproducer runs, 10 x 7 scripts x 2 widths
  python benchmarks/stress.py --parts repro --channels-last      # the old trigger: expect crashes
  python benchmarks/stress.py --parts valgrind --valgrind 3      # 3 runs channels_last vs 3 contiguous
"""
import argparse
import collections
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

KVASIR = os.path.join(ROOT, "..", "shared", "data", "real-samples", "Kvasir-SEG")
# Flags that only make a run short (as tests/test_harness.py's FAST and REAL_RUNS); the split and counts are
# each script's "other" defaults. region_uncertainty.py's ResNet encoder needs 64 px.
FAST = ["--epochs-initial", "1", "--epochs", "1", "--rounds", "2", "--batch-size", "8", "--image-size", "32"]
SCRIPTS = {
    "ceal_mcdropout.py": ["--mc-passes", "2", "--pseudo-step", "1"],
    "ssl_coldstart.py": ["--ssl-epochs", "1", "--shuffle-blocks", "10", "--clusters", "2"],
    "region_uncertainty.py": ["--mc-passes", "2", "--image-size", "64"],
    "polyp_weighted_cluster.py": ["--kmeans-init", "1", "--split", "6", "2", "2", "--initial", "2", "--query", "2"],  # its
    # kvasir-seg row is the paper's (900 / 0 / 100 split, 30 + 30 per round): scaled to the 10 samples
    "dsal_fingerbones.py": [],
    "example_tta.py": [],
    "example_claspe.py": [],
}

REPRO = """
import sys, torch
sys.path.insert(0, {root!r})
import common
fmt = torch.channels_last if {force} else common.memory_format(torch.device("cpu"))
x = torch.rand(2, {cin}, 8, 8).contiguous(memory_format=fmt).requires_grad_()
w = torch.randn(8, {cin}, 1, 1).contiguous(memory_format=fmt).requires_grad_()
for _ in range({iters}):
    torch.nn.functional.conv2d(x, w, stride=2).sum().backward()
print("ok", fmt)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="repro,scripts", help="comma-separated: repro, scripts, valgrind "
                   "(default: repro,scripts; valgrind is added by --valgrind K)")
    p.add_argument("--repro-runs", type=int, default=30, help="reproducer runs per thread count (default: 30)")
    p.add_argument("--repro-threads", default="1,2", help="thread counts of the reproducer (default: 1,2)")
    p.add_argument("--iterations", type=int, default=200, help="backward passes per reproducer run (default: 200)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels of the reproducer (default: 4; the "
                   "issue saw crashes at 2 and 4, none at 8 and more)")
    p.add_argument("--channels-last", action="store_true", help="force channels_last in the reproducer (the old "
                   "trigger) instead of the project's CPU format")
    p.add_argument("--valgrind", type=int, default=0, metavar="K", help="also run the reproducer under valgrind, "
                   "K runs channels_last and K contiguous (3 iterations each; minutes per run)")
    p.add_argument("--repeats", type=int, default=10, help="runs of each script per width (default: 10)")
    p.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated scripts (default: all seven)")
    p.add_argument("--widths", default="4,16", help="comma-separated --width values (default: 4,16)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the script runs (default: 2)")
    p.add_argument("--isa", default="avx2", choices=["avx2", "native"], help="avx2 (default): every child runs "
                   "with ONEDNN_MAX_CPU_ISA=AVX2, the kernels of an AVX2-only CPU, where the bug lives; native: "
                   "oneDNN's own choice (AVX-512 kernels on a CPU that has them)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run before it counts as hung (default: 600)")
    args = p.parse_args(argv)
    args.parts = set(args.parts.split(",")) | ({"valgrind"} if args.valgrind else set())
    return args


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = re.search(r"model name\s*:\s*(.*)", info).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
        return name, [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except (OSError, AttributeError):
        return platform.processor() or platform.machine(), []


def commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return f"{head or '?'}{' (working tree dirty: tracked files modified)' if dirty else ' (clean tree)'}"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def child_env(args, threads, cache):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", ALSEG_CACHE=cache)
    if args.isa == "avx2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    return env


def run(cmd, env, timeout):
    """(return code, last stderr line, seconds); a hang past the timeout counts as code 'timeout'."""
    t0 = time.time()
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = (out.stderr.strip().splitlines() or [""])[-1][:100]
        return out.returncode, tail, time.time() - t0
    except subprocess.TimeoutExpired:
        return "timeout", "", time.time() - t0


def describe(codes):
    bad = [c for c in codes if c != 0]
    kinds = collections.Counter("timeout" if c == "timeout" else f"signal {-c}" if c < 0 else f"exit {c}" for c in bad)
    return f"{len(bad)} of {len(codes)} failed" + (f" ({', '.join(f'{v} x {k}' for k, v in kinds.items())})" if bad else "")


def part_repro(args, cache):
    fmt = "channels_last (forced)" if args.channels_last else f"{common.memory_format(torch.device('cpu'))} " \
          "(common.memory_format(cpu), the project's CPU format)"
    print(f"\n== reproducer: conv2d 1x1 stride 2, input (2, {args.in_channels}, 8, 8), weight (8, {args.in_channels}, "
          f"1, 1), {args.iterations} backward passes per run, memory format {fmt}", flush=True)
    code = REPRO.format(root=ROOT, force=args.channels_last, cin=args.in_channels, iters=args.iterations)
    total = {}
    for nt in [int(t) for t in args.repro_threads.split(",")]:
        codes, t0 = [], time.time()
        for k in range(args.repro_runs):
            rc, tail, _ = run([sys.executable, "-c", code], child_env(args, nt, cache), args.timeout)
            codes.append(rc)
            if rc != 0:
                print(f"   run {k + 1} at {nt} thread(s): exit {rc} {tail}", flush=True)
        total[nt] = codes
        print(f"   {nt} thread(s): {describe(codes)}  [{time.time() - t0:.0f}s]", flush=True)
    return total


def dnnl_errors(log):
    """(invalid writes, invalid reads) among valgrind's error records in oneDNN: a stack that names a dnnl frame,
    or whose top frame is unnamed JIT code ("at 0x...: ???", oneDNN's jitted kernels; valgrind cannot unwind
    through them, so such records often show no dnnl frame). Python's and ld.so's own noise names its frames."""
    writes = reads = 0
    for block in re.split(r"\n==\d+== \n", log):
        head = block.split(" Address ")[0]
        if "dnnl" not in head and not re.search(r"Invalid \w+ of size \d+\n==\d+==    at 0x[0-9A-F]+: \?\?\?", block):
            continue
        writes += len(re.findall(r"Invalid write of size", block))
        reads += len(re.findall(r"Invalid read of size", block))
    return writes, reads


def part_valgrind(args, cache):
    if not shutil.which("valgrind"):
        print("\n== valgrind: not installed, skipped")
        return {}
    print(f"\n== reproducer under valgrind (memcheck, --error-limit=no), 3 iterations, {args.in_channels} input "
          f"channels, 1 thread, {args.valgrind} runs per format: runs whose log shows an invalid write in a dnnl "
          "or JIT frame (valgrind has no AVX-512: oneDNN runs its AVX2 kernels under it whatever --isa says)", flush=True)
    out = {}
    for force, name in ((True, "channels_last"), (False, "contiguous")):
        code = REPRO.format(root=ROOT, force=force, cin=args.in_channels, iters=3).replace(
            "common.memory_format(torch.device(\"cpu\"))", "torch.contiguous_format")
        hits, t0 = [], time.time()
        for _ in range(args.valgrind):
            with tempfile.NamedTemporaryFile("r", suffix=".vg.log") as logf:
                rc, _, _ = run(["valgrind", "--error-limit=no", f"--log-file={logf.name}", sys.executable, "-c", code],
                               child_env(args, 1, cache), args.timeout * 4)
                w, r = dnnl_errors(open(logf.name).read())
            hits.append((rc, w, r))
        out[name] = hits
        print(f"   {name:13s}: {sum(w > 0 for _, w, _ in hits)} of {len(hits)} runs with an invalid write in dnnl/JIT "
              f"frames; per run (exit, invalid writes, invalid reads in dnnl/JIT frames): {hits}  "
              f"[{time.time() - t0:.0f}s]", flush=True)
    return out


def tiny_data(tmp):
    if os.path.isdir(KVASIR):
        return "kvasir-seg", KVASIR, "Kvasir-SEG real samples (10 images)"
    d = common.make_synthetic(24, 64, 3, seed=0)
    d.ids = [f"img{k:03d}" for k in range(len(d))]
    return "folder", str(common.write_folder(d, os.path.join(tmp, "synthetic"))), "synthetic folder (24 images)"


def part_scripts(args, cache, tmp):
    data, folder, label = tiny_data(tmp)
    scripts, widths = args.scripts.split(","), [int(w) for w in args.widths.split(",")]
    print(f"\n== scripts: {args.repeats} runs per script and width at OMP_NUM_THREADS={args.threads}, on the {label}; "
          f"each run: python SCRIPT --device cpu --data {data} --data-dir {os.path.relpath(folder, ROOT)} "
          f"{' '.join(FAST)} --width W [script flags] --seed k", flush=True)
    table = {}
    for script in scripts:
        for width in widths:
            codes, t0 = [], time.time()
            for k in range(args.repeats):
                out = tempfile.mkdtemp(dir=tmp)
                cmd = [sys.executable, os.path.join(ROOT, script), "--device", "cpu", "--data", data, "--data-dir",
                       folder, *FAST, *SCRIPTS[script], "--width", str(width), "--seed", str(k), "--out", out]
                rc, tail, _ = run(cmd, child_env(args, args.threads, cache), args.timeout)
                codes.append(rc)
                if rc != 0:
                    print(f"   {script} width {width} run {k + 1}: exit {rc} {tail}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            table[(script, width)] = (codes, time.time() - t0)
            print(f"   {script:26s} width {width:2d}: {describe(codes)}  [{time.time() - t0:.0f}s]", flush=True)
    print("\n| script | width | runs | non-zero exits | signals | s per run |\n|---|---|---|---|---|---|")
    for (script, width), (codes, secs) in table.items():
        bad = [c for c in codes if c != 0]
        sig = [c for c in bad if c != "timeout" and c < 0]
        print(f"| {script} | {width} | {len(codes)} | {len(bad)} | {len(sig)} | {secs / max(1, len(codes)):.1f} |")
    return table


def main(argv=None):
    args = parse_args(argv)
    name, flags = cpu_model()
    t0 = time.time()
    print(f"command: python {' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")
    print(f"commit {commit()}; torch {torch.__version__}; CPU {name} ({os.cpu_count()} cores; flags: "
          f"{', '.join(flags) or 'none of avx2/avx512f'}); oneDNN ISA cap "
          f"{'ONEDNN_MAX_CPU_ISA=AVX2 (--isa avx2)' if args.isa == 'avx2' else 'none (--isa native)'}; "
          f"load average {os.getloadavg()[0]:.1f} at start; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="stress-") as tmp:
        cache = os.path.join(tmp, "cache")
        results = {}
        if "repro" in args.parts:
            results["repro"] = part_repro(args, cache)
        if "valgrind" in args.parts and args.valgrind:
            results["valgrind"] = part_valgrind(args, cache)
        if "scripts" in args.parts:
            results["scripts"] = part_scripts(args, cache, tmp)
    print(f"\nsummary ({time.time() - t0:.0f}s, load average {os.getloadavg()[0]:.1f} at the end):")
    for nt, codes in results.get("repro", {}).items():
        print(f"  reproducer, {nt} thread(s): {describe(codes)}")
    if "scripts" in results:
        codes = [c for cs, _ in results["scripts"].values() for c in cs]
        print(f"  scripts at {args.threads} threads: {describe(codes)}")
    for fmt, hits in results.get("valgrind", {}).items():
        print(f"  valgrind, {fmt}: {sum(w > 0 for _, w, _ in hits)} of {len(hits)} runs with an invalid write in dnnl/JIT frames")
    return results


if __name__ == "__main__":
    main()
