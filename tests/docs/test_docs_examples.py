"""Every ```python and ```console block in README.md and docs/*.md runs, so the docs stay in sync
with the code; and docs/results.md is what bench/make_results_page.py makes of bench/RESULTS.md.

Python blocks of one file run in order as one module (later blocks use earlier definitions; a
module with a file, because a pass's uuid hashes its source). Console blocks: each `$ fxfuse ...`
line runs in-process in a scratch directory and must exit 0; the lines under it must appear in
its stdout in that order (`...` skips any number of lines); a file it writes with -o must exist.
"""
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fxfuse.frontends.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.M | re.S)


def blocks(path, lang):
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def _id(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "python")], ids=_id)
def test_python_blocks(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "docs_example_" + re.sub(r"\W", "_", path.stem)
    file = tmp_path / f"{name}.py"
    file.write_text("\n\n".join(blocks(path, "python")))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)


def _commands(body):
    """(argv, expected lines) per `$ fxfuse ...` line of a console block."""
    out = []
    for line in body.splitlines():
        if line.startswith("$ "):
            argv = shlex.split(line[2:])
            assert argv[0] == "fxfuse", f"console examples run fxfuse only: {line}"
            out.append((argv[1:], []))
        else:
            assert out, f"output before any command: {line!r}"
            out[-1][1].append(line)
    return out


def _in_order(expected, actual):
    """Each expected line (whitespace-normalized) appears in `actual` after the previous one."""
    norm = [" ".join(a.split()) for a in actual]
    i = 0
    for line in expected:
        if line.strip() in ("...", ""):
            continue
        want = " ".join(line.split())
        while i < len(norm) and norm[i] != want:
            i += 1
        if i == len(norm):
            return line
        i += 1
    return None


CONSOLE = [(p, k) for p in DOCS for k in range(len(blocks(p, "console")))]


@pytest.mark.parametrize("path, k", CONSOLE, ids=[f"{_id(p)}#{k}" for p, k in CONSOLE])
def test_console_blocks(path, k, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, expected in _commands(blocks(path, "console")[k]):
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"fxfuse {' '.join(argv)} exited {rc}: {err}"
        missing = _in_order(expected, out.splitlines())
        assert missing is None, f"fxfuse {' '.join(argv)}: line not in its output (in order): {missing!r}\n{out}"
        if "-o" in argv:  # what it claims to write is there (.dot files instead, without Graphviz)
            stem = Path(argv[argv.index("-o") + 1]).stem
            assert list(tmp_path.glob(stem + "*")), f"fxfuse {' '.join(argv)} wrote nothing like {stem}"


def test_results_page_is_up_to_date():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "make_results_page.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_doc_images_exist():
    for path in DOCS:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text()):
            assert (path.parent / target).is_file(), f"{_id(path)} shows a missing picture: {target}"
