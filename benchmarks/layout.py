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


def part_of(path):
    """{line number: the top-level part of the file it stands in}: the docstring, DEFAULTS (the table and what
    builds it), parse_args (the flags), main(), or the method (every other function)."""
    text = open(path).read()
    tree, lines, parts = ast.parse(text), text.splitlines(), {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            name = node.name if node.name in ("main", "parse_args") else "method functions"
        elif isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            name = "docstring"
        elif isinstance(node, ast.Assign):
            name = "DEFAULTS"
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while first > 1 and lines[first - 2].startswith("#"):  # the comment block above a part is that part's
            first -= 1
        parts.update({i: name for i in range(first, node.end_lineno + 1)})
    return parts


def diff_by_part(a, b, out):
    """The lines of `diff a b` counted by the part of the script they stand in ("other": imports, blank lines
    between parts, and diff's own hunk lines: "3,11c3,10" and "---")."""
    pa, pb, count, la, lb = part_of(os.path.join(ROOT, a)), part_of(os.path.join(ROOT, b)), {}, 0, 0
    for line in out.splitlines():
        m = re.match(r"(\d+)(?:,\d+)?[acd](\d+)", line)
        if m:
            la, lb = int(m.group(1)), int(m.group(2))  # where the hunk's "<" and ">" lines start
            name = "other"
        elif line.startswith("< "):
            name, la = pa.get(la, "other"), la + 1
        elif line.startswith("> "):
            name, lb = pb.get(lb, "other"), lb + 1
        else:
            name = "other"
        count[name] = count.get(name, 0) + 1
    return count


def main():
    src = {s: open(os.path.join(ROOT, s)).read() for s in SCRIPTS}
    for s in SCRIPTS:
        print(f"main() of {s}: {main_lines(os.path.join(ROOT, s))} lines (target <= 90)")
    diff = subprocess.run(["diff", "ceal_mcdropout.py", "example_tta.py"], cwd=ROOT, capture_output=True, text=True)
    print(f"diff ceal_mcdropout.py example_tta.py | wc -l: {len(diff.stdout.splitlines())} (target <= 130); by part: "
          + ", ".join(f"{k} {v}" for k, v in diff_by_part("ceal_mcdropout.py", "example_tta.py", diff.stdout).items()))
    common = open(os.path.join(ROOT, "common.py")).read()
    print(f"common.py: {len(common.splitlines())} lines (target <= 1100); beside it: "
          + ", ".join(f"{m} {len(open(os.path.join(ROOT, m)).read().splitlines())}"
                      for m in ("runfolder.py", "loaders.py", "plots.py", "tables.py", "oracle.py", "progress.py",
                                "unet.py")))
    both = common + open(os.path.join(ROOT, "runfolder.py")).read()  # runfolder.py: common re-exports it
    names = [n.name for n in ast.parse(both).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    inside = {n: len(re.findall(rf"\b{n}\(", both)) - 1 for n in names}  # calls within the two files themselves
    single = [(n, [s for s in SCRIPTS if f"common.{n}" in src[s]]) for n in names]
    single = [(n, users[0]) for n, users in single if len(users) == 1 and not inside[n]]
    print(f"functions of common.py and runfolder.py used by one script only (and not by the two): {len(single)}"
          + "".join(f"\n  {n}: {user}" for n, user in single))


if __name__ == "__main__":
    main()
