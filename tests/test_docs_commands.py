"""Every script command printed in the README, in docs/ and in the scripts' own docstrings parses with that
script's flags: a flag renamed or removed, a choice dropped, or a value the script refuses (common.resolve's
checks), fails here rather than in a reader's terminal. Only the flags are checked; nothing is run."""
import os
import pathlib
import re

import pytest

import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
# every script beside common.py built on its shared parser (a new method's script is found, as in test_interface)
SCRIPTS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f != "common.py"
                 and "shared_parser(" in (ROOT / f).read_text(encoding="utf-8"))
COMMAND = re.compile(r"python (" + "|".join(SCRIPTS) + r")\.py([^#`|;&>\"\n]*)")
# shell variables of the docs' loops: the shared-flag blocks ($C, $D, $K, $S) are left out, the rest given a value
VARIABLES = [(r"--strategy \$s\b", "--strategy random"), (r"--seed S\b", "--seed 0"), (r"\$(C|D|K|S)\b", ""),
             (r"\$(seed|s)\b", "0"), (r"\$(tu|tb)\b", "0.25"), (r"\$R\b", "runs/RUN"), (r"<[^>]*>", "RUN")]


def commands():
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *(ROOT / f"{s}.py" for s in SCRIPTS)]:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")  # a command continued on the next line
        for m in COMMAND.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            args = m.group(2).replace("[", " ").replace("]", " ")  # an optional part, as in [--channels 3]
            for pattern, value in VARIABLES:
                args = re.sub(pattern, value, args)
            found.append(pytest.param(m.group(1), args.split(), id=f"{path.name}:{line}"))
    return found


def test_the_commands_are_found():
    found = commands()
    assert len(SCRIPTS) >= 7 and len(found) > 60 and {p.values[0] for p in found} == set(SCRIPTS)


@pytest.mark.parametrize("script, argv", commands())
def test_a_printed_command_parses(script, argv):
    module = __import__(script)
    assert "$" not in " ".join(argv), f"a shell variable this test does not know: {argv}"
    try:
        module.parse_args(argv)
    except SystemExit as e:  # argparse: an unknown flag or a bad value (its message is on stderr above)
        pytest.fail(f"python {script}.py {' '.join(argv)}: argparse exited with {e.code}")
    except common.UserError as e:
        pytest.fail(f"python {script}.py {' '.join(argv)}: {e}")
