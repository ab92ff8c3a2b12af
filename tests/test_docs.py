"""The docs cannot drift from the code: every ```console block in README.md and docs/*.md runs.

Convention: in a ```console block each `$ ` line is a command (a trailing `\\` continues it on
the next line) and the lines up to the next `$ ` are its output, stdout and stderr together;
`...` stands for any lines (alone on a line) or any part of a line; a last line `[exit N]` says
the command exits with N (else 0). The commands of a block run in order, each in a fresh shell,
in one new empty folder, without CUDA and without RESNET_CLI_DATA, so they need no dataset.
Output recorded from long or real-data runs goes in ```text blocks, which are not run.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import pytest
from conftest import BIN, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Console scripts run inside this process (no start-up cost) because calling their entry point
# is exactly what the installed script does, and they touch no device, no Hydra app, no files.
IN_PROCESS = {"resnet-summary"}
# Blocks that train or sweep take tens of seconds on 2 CPU cores.
SLOW_WORDS = ("resnet-train data=synthetic", "resnet-train -m")


@dataclass
class Command:
    line: int
    text: str
    expected: list[str]
    exit_code: int = 0


@dataclass
class Block:
    page: Path
    line: int
    commands: list[Command]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def console_blocks(page: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        block = Block(page, i + 1, [])
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            if line.startswith("$ "):
                start, text = i + 1, line[2:]
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                block.commands.append(Command(start, text, []))
            elif block.commands:
                block.commands[-1].expected.append(line)
            else:
                raise AssertionError(f"{page}:{i + 1}: output before the first `$ ` command")
            i += 1
        for c in block.commands:
            m = re.fullmatch(r"\[exit (\d+)\]", c.expected[-1].strip()) if c.expected else None
            if m:
                c.exit_code, c.expected = int(m.group(1)), c.expected[:-1]
        blocks.append(block)
        i += 1
    return blocks


def _pattern(expected: list[str]) -> re.Pattern:
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("...")) + r"\n")
    return re.compile("".join(parts))


def _normalize(lines: list[str]) -> list[str]:
    lines = [ln.rstrip() for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def output_matches(expected: list[str], actual: str) -> bool:
    text = "".join(ln + "\n" for ln in _normalize(actual.splitlines()))
    return _pattern(_normalize(expected)).fullmatch(text) is not None


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _run_in_process(argv: list[str], cwd: Path, monkeypatch) -> tuple[int, str]:
    module, _, func = _scripts()[argv[0]].partition(":")
    entry = getattr(import_module(module), func)
    out = io.StringIO()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            entry()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue()


def _shell_env(mpl_config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RESNET_CLI_DATA")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               MPLBACKEND="Agg", MPLCONFIGDIR=str(mpl_config))
    return env


@pytest.fixture(scope="session")
def mpl_config(tmp_path_factory) -> Path:
    """A matplotlib cache built beforehand: a first use logs 'generated new fontManager', which
    a user sees once per machine and the pages do not show."""
    folder = tmp_path_factory.mktemp("mplconfig")
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=_shell_env(folder), check=True,
                   capture_output=True, timeout=300)
    return folder


def _run_in_shell(text: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


def run_command(text: str, cwd: Path, monkeypatch, env: dict[str, str]) -> tuple[int, str]:
    try:
        argv = shlex.split(text)
    except ValueError:
        argv = []
    plain = argv and all(re.fullmatch(r"[\w./=,:+-]+", a) for a in argv)  # no shell syntax
    if plain and argv[0] in IN_PROCESS:
        return _run_in_process(argv, cwd, monkeypatch)
    return _run_in_shell(text, cwd, env)


def _params():
    for page in PAGES:
        for block in console_blocks(page):
            slow = any(w in c.text for c in block.commands for w in SLOW_WORDS)
            yield pytest.param(block, id=block.id, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("block", list(_params()))
def test_console_example(block: Block, tmp_path: Path, monkeypatch, mpl_config: Path):
    env = _shell_env(mpl_config)
    for c in block.commands:
        code, out = run_command(c.text, tmp_path, monkeypatch, env)
        where = f"{block.page.relative_to(REPO)}:{c.line}: $ {c.text}"
        if not output_matches(c.expected, out):
            diff = "\n".join(difflib.unified_diff(_normalize(c.expected), _normalize(out.splitlines()),
                                                  "page", "actual", lineterm=""))
            pytest.fail(f"{where}\noutput differs from the page:\n{diff}")
        assert code == c.exit_code, f"{where}\nexit code {code}, the page says {c.exit_code}\n{out}"


def test_pages_have_console_examples():
    """The pages that show commands run some of them (a parser that finds none passes nothing)."""
    counts = {p.name: sum(len(b.commands) for b in console_blocks(p)) for p in PAGES}
    assert counts["README.md"] >= 2
    assert sum(counts.values()) >= 12, counts


@pytest.mark.parametrize("expected, actual, ok", [
    (["a", "...", "d"], "a\nb\nc\nd\n", True),
    (["a", "...", "d"], "a\nd\n", True),
    (["x ... z"], "x 1 2 z\n", True),
    (["x ... z"], "x 1 2 y\n", False),
    (["a", "b"], "a\nb\nc\n", False),  # extra output is a difference
    (["a (b) [c]*"], "a (b) [c]*  \n\n", True),  # literal text; trailing blanks do not count
])
def test_output_matching(expected, actual, ok):
    assert output_matches(expected, actual) is ok


def test_console_blocks_parse(tmp_path: Path):
    page = tmp_path / "p.md"
    page.write_text("text\n```console\n$ cmd a \\\n    b\nout 1\n...\n[exit 2]\n$ other\n```\n```text\n$ not run\n```\n")
    (block,) = console_blocks(page)
    assert [(c.text, c.expected, c.exit_code) for c in block.commands] == [
        ("cmd a  b", ["out 1", "..."], 2), ("other", [], 0)]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are code
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files or headings: {broken}"


def test_resilience_lists_every_key_a_resume_may_change():
    from resnet_cli.resume import RESUMABLE

    text = " ".join((REPO / "docs" / "resilience.md").read_text().split())
    listed = [k for k in RESUMABLE if k != "resume" and f"`{k}`" not in text and f"`{k}.*`" not in text]
    assert not listed, f"docs/resilience.md does not list {listed}"
