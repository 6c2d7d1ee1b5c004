"""docs/tour.md must run: every ```python block is executed and its printed output checked.

The rules, which the tour states at its top:
- Blocks under one `## ` heading share one namespace, in order (as if pasted into one
  Python session); every `## ` section starts from a fresh namespace.
- A line ending in `# -> text` must be the last line of a top-level statement: what
  that statement prints, stripped, must equal `text`.
- A ```output block right after a ```python block is the whole printed output of that
  block (trailing spaces ignored).
- Each `**Code:**` line names files (markdown links) and the functions or classes the
  section is about: the files must exist and define those names.
- Blocks are written to take well under 2 s each; how long they take is not checked here
  (a wall-clock limit in a pass/fail test fails on a slow moment of a shared machine:
  timing belongs in bench/).

Expected outputs come from random-init models seeded with `manual_seed(0)`. NumPy
draws them on 'cpu' and 'strict' alike; CuPy draws other numbers from the same seed,
so under TINYGRAD_LITE_DEVICE=cuda the blocks run but their printed values are not
compared.
"""
from __future__ import annotations

import ast
import contextlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tinygrad_lite import backend

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "tour.md"
CHECK_VALUES = backend.default_device() != "cuda"
EXPECT = re.compile(r"#\s*->\s?(.*)$")


@dataclass
class Block:
    line: int  # line number in tour.md of the block's first code line
    code: str
    output: str | None = None  # the ```output block that follows it, if any


@dataclass
class Section:
    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)
    code_lines: list[tuple[int, str]] = field(default_factory=list)  # the **Code:** lines


def parse_tour(text: str) -> list[Section]:
    sections = [Section("(before the first heading)", 1)]
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            sections.append(Section(line[3:].strip(), i + 1))
        elif line.startswith("**Code:**"):
            sections[-1].code_lines.append((i + 1, line))
        elif line.startswith("```"):
            info, start = line[3:].strip(), i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            body = "\n".join(lines[start:i]) + "\n"
            if info == "python":
                sections[-1].blocks.append(Block(start + 1, body))
            elif info == "output" and sections[-1].blocks and sections[-1].blocks[-1].output is None:
                sections[-1].blocks[-1].output = body
        i += 1
    return [s for s in sections if s.blocks or s.code_lines]


SECTIONS = parse_tour(TOUR.read_text(encoding="utf-8"))


def run_block(block: Block, namespace: dict, where: str) -> None:
    """Execute one block statement by statement, checking `# ->` lines and ```output."""
    try:
        tree = ast.parse(block.code)
    except SyntaxError as e:
        pytest.fail(f"{where}, line {block.line + (e.lineno or 1) - 1}: syntax error: {e.msg}")
    code_lines = block.code.splitlines()
    expected = {n + 1: m.group(1).strip() for n, text in enumerate(code_lines)
                if (m := EXPECT.search(text))}
    last_lines = {stmt.end_lineno for stmt in tree.body}
    for n in expected:
        if n not in last_lines:
            pytest.fail(f"{where}, line {block.line + n - 1}: '# ->' must end a top-level statement")
    printed = io.StringIO()
    for stmt in tree.body:
        doc_line = block.line + stmt.lineno - 1
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(ast.Module([stmt], []), f"tour.md:{doc_line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"{where}, line {doc_line}: {type(e).__name__}: {e}")
        printed.write(out.getvalue())
        want = expected.get(stmt.end_lineno)
        if want is not None and CHECK_VALUES and out.getvalue().strip() != want:
            pytest.fail(f"{where}, line {block.line + stmt.end_lineno - 1}: printed "
                        f"{out.getvalue().strip()!r}, the tour says {want!r}")
    if block.output is not None and CHECK_VALUES:
        got = [s.rstrip() for s in printed.getvalue().rstrip().splitlines()]
        want_lines = [s.rstrip() for s in block.output.rstrip().splitlines()]
        if got != want_lines:
            pytest.fail(f"{where}, block at line {block.line}: printed\n" + "\n".join(got)
                        + "\nbut the ```output block says\n" + "\n".join(want_lines))


def test_the_tour_has_its_sections():
    assert len(SECTIONS) >= 15, "docs/tour.md lost its ## sections"
    assert sum(len(s.blocks) for s in SECTIONS) >= 20


@pytest.mark.parametrize("section", SECTIONS, ids=[s.title for s in SECTIONS])
def test_section_runs_and_prints_what_it_says(section: Section):
    namespace: dict = {"__name__": "__tour__"}
    for block in section.blocks:
        run_block(block, namespace, f"docs/tour.md, section {section.title!r}")


@pytest.mark.parametrize("section", [s for s in SECTIONS if s.code_lines],
                         ids=[s.title for s in SECTIONS if s.code_lines])
def test_code_pointers_exist(section: Section):
    """`**Code:** [`a.py`](../a.py): `f`, `C.m`` -> a.py exists and defines f and m."""
    for line_no, line in section.code_lines:
        files = re.findall(r"\]\(\.\./([^)#]+)\)", line)
        assert files, f"docs/tour.md line {line_no}: a **Code:** line links no file"
        sources = ""
        for f in files:
            path = ROOT / f
            assert path.is_file(), f"docs/tour.md line {line_no}: {f} does not exist"
            sources += path.read_text(encoding="utf-8")
        rest = re.sub(r"\[`[^`]*`\]\([^)]*\)", "", line)  # drop the links,
        rest = re.sub(r"\([^)]*\)", "", rest)  # then remarks in parentheses
        names = re.findall(r"`([\w.]+)`", rest)
        assert names, f"docs/tour.md line {line_no}: a **Code:** line names no function or class"
        for name in names:  # `Class.method`: both parts must be defined
            for part in name.split("."):
                assert re.search(rf"^\s*(def|class)\s+{part}\b|^\s*{part}\s*[:=]", sources, re.M), \
                    f"docs/tour.md line {line_no}: {name} is not defined in {', '.join(files)}"


def test_contents_links_point_at_headings():
    """Each `(#anchor)` link matches a heading, slugged as GitHub does."""
    text = TOUR.read_text(encoding="utf-8")
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in slugs, f"docs/tour.md: the link #{anchor} matches no heading"
