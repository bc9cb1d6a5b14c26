import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "real-samples")
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test gets a data cache of its own, never the user's ~/.cache/alseg."""
    monkeypatch.setenv("ALSEG_CACHE", str(tmp_path_factory.mktemp("cache")))


def run_script(script, *args, timeout=300, check=True, env_extra=None, device=True):
    """Run a script in a subprocess on the CPU (as a user would) and return the CompletedProcess."""
    env = dict(os.environ, **{"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *(["--device", "cpu"] if device else []),
                          *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def run_dir_from(out):
    """The run folder a script printed in its last line ('done: ... ; RUN_DIR')."""
    return out.stdout.strip().splitlines()[-1].rsplit(";", 1)[-1].strip()
