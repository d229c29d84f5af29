"""Generate docs/results.md from bench/RESULTS.md (the benchmark's own record stays the source).

    python bench/make_results_page.py           # write docs/results.md
    python bench/make_results_page.py --check   # exit 1 if docs/results.md is out of date

The page gets a note saying where it comes from, a table of contents, and links that still
resolve from docs/ (RESULTS.md names its scripts relative to bench/).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "RESULTS.md"
PAGE = ROOT / "docs" / "results.md"
SCRIPT = re.compile(r"`(\w+\.(?:py|sh))`")


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def render(source: str) -> str:
    lines = source.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"{SOURCE} must start with a '# ' title")
    out, fenced = [], False
    for line in lines[1:]:
        fenced ^= line.startswith("```")
        if not fenced and not line.startswith("#"):
            # Script names become links into bench/ (not in headings, whose anchors the TOC uses).
            line = SCRIPT.sub(lambda m: f"[`{m.group(1)}`](../bench/{m.group(1)})"
                              if (ROOT / "bench" / m.group(1)).exists() else m.group(0), line)
            line = line.replace("the scripts in this folder", "the scripts in `bench/`")
        out.append(line)
    body = "\n".join(out).strip("\n")
    toc = [f"- [{t}](#{_anchor(t)})" for t in re.findall(r"^## (.+)$", body, flags=re.M)]
    head = [lines[0].replace("# fxfuse benchmark results", "# Results"), "",
            "<!-- Generated from bench/RESULTS.md by bench/make_results_page.py; edit RESULTS.md, then run it. -->",
            "", "Measured by the scripts in [`bench/`](../bench/); the record is "
            "[`bench/RESULTS.md`](../bench/RESULTS.md).", "", *toc, ""]
    return "\n".join(head) + "\n" + body + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is out of date")
    args = p.parse_args(argv)
    page = render(SOURCE.read_text())
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python bench/make_results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
