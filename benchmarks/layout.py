"""The layout targets of issue 15 in one command: each script's main() length, the diff between CEAL and the
example, common.py's length, and the functions of common.py that only one script calls.

  python benchmarks/layout.py
"""
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ceal_mcdropout.py", "ssl_coldstart.py", "region_uncertainty.py", "polyp_weighted_cluster.py",
           "dsal_fingerbones.py", "example_tta.py", "example_claspe.py"]


def main_lines(path):
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return fn.end_lineno - fn.lineno + 1


def main():
    src = {s: open(os.path.join(ROOT, s)).read() for s in SCRIPTS}
    for s in SCRIPTS:
        print(f"main() of {s}: {main_lines(os.path.join(ROOT, s))} lines (target <= 90)")
    diff = subprocess.run(["diff", "ceal_mcdropout.py", "example_tta.py"], cwd=ROOT, capture_output=True, text=True)
    print(f"diff ceal_mcdropout.py example_tta.py | wc -l: {len(diff.stdout.splitlines())} (target <= 130)")
    common = open(os.path.join(ROOT, "common.py")).read()
    print(f"common.py: {len(common.splitlines())} lines (target <= 1100); beside it: "
          + ", ".join(f"{m} {len(open(os.path.join(ROOT, m)).read().splitlines())}"
                      for m in ("loaders.py", "plots.py", "oracle.py", "unet.py")))
    names = [n.name for n in ast.parse(common).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    inside = {n: len(re.findall(rf"\b{n}\(", common)) - 1 for n in names}  # calls within common.py itself
    single = [(n, [s for s in SCRIPTS if f"common.{n}" in src[s]]) for n in names]
    single = [(n, users[0]) for n, users in single if len(users) == 1 and not inside[n]]
    print(f"functions of common.py used by one script only (and not by common.py): {len(single)}"
          + "".join(f"\n  {n}: {user}" for n, user in single))


if __name__ == "__main__":
    main()
