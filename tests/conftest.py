import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "real-samples")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/interface.py, the interface check


def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="list the N tests that used the most CPU time (user + sys of pytest and of the scripts "
                          "a test ran; a module fixture counts in its first test); 0 lists all")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t = os.times()
    yield
    u = os.times()
    cpu = sum(getattr(u, k) - getattr(t, k) for k in ("user", "system", "children_user", "children_system"))
    item.config.__dict__.setdefault("_alseg_cpu", []).append((cpu, item.nodeid))
    if os.environ.get("ALSEG_CPU_LOG"):  # the same, one line per test as it finishes (a long run read midway)
        with open(os.environ["ALSEG_CPU_LOG"], "a") as f:
            f.write(f"{cpu:.2f} {item.nodeid}\n")


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("--cpu-durations")
    if n is None:
        return
    rows = sorted(config.__dict__.get("_alseg_cpu", []), reverse=True)
    if not rows and getattr(config.option, "numprocesses", None):  # pytest-xdist: the tests ran in the workers
        terminalreporter.write_line("--cpu-durations counts in one process: run it without -n")
        return
    terminalreporter.write_sep("=", f"CPU time (user + sys, scripts included): {sum(c for c, _ in rows):.1f} s in "
                                    f"{len(rows)} tests; the slowest {n or len(rows)}")
    for cpu, nodeid in rows[:n or len(rows)]:
        terminalreporter.write_line(f"{cpu:8.2f}s cpu  {nodeid}")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test gets a data cache of its own, never the user's ~/.cache/alseg."""
    monkeypatch.setenv("ALSEG_CACHE", str(tmp_path_factory.mktemp("cache")))


# Threads of the scripts the tests run. One: on these tiny models (width 4, 32 px) a second thread saves
# nothing, and on a busy machine two OpenMP threads spin (a TINY ceal run on the shared 2-core machine: 16 s of
# CPU in 58 s with two threads, 4 s in 16 s with one). tests/test_harness.py runs every script with two
# threads, as a user's machine would. The README's command runs two test processes (pytest-xdist, -n 2), so the
# second core works on another test instead.
THREADS = "1"
torch.set_num_threads(int(THREADS))  # and the same in this process (main() in-process), so results agree


def run_script(script, *args, timeout=300, check=True, env_extra=None, device=True):
    """Run a script in a subprocess on the CPU (as a user would) and return the CompletedProcess."""
    env = dict(os.environ, **{"OMP_NUM_THREADS": THREADS, "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *(["--device", "cpu"] if device else []),
                          *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def run_dir_from(out):
    """The run folder a script printed in its last line ('done: ... ; RUN_DIR')."""
    return out.stdout.strip().splitlines()[-1].rsplit(";", 1)[-1].strip()
