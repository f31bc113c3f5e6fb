"""The documentation: README.md as the front page and the MkDocs site under docs/ (configuration
docs/mkdocs/mkdocs.yml).

- `mkdocs build --strict` into a temporary directory: a broken link, a missing anchor or image, or a page left out of
  the navigation fails the build;
- every page under docs/ is in the navigation, and every page the navigation names exists;
- every command quoted in a fenced shell block of the README or of a page exists: a project script is there,
  executable and parses, a module or script answers `--help`, and every `--flag` quoted for it is one its `--help`
  lists; the project paths a command reads exist; an outside program is one of a known few (curl, docker, helm, ...);
- every fenced Python block compiles, and its imports from the project resolve;
- the README stays a front page: at most 250 lines, the quick start and the deployment path on its first screen,
  and its links inside the repository lead to files (and headings) that exist.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = DOCS / "mkdocs" / "mkdocs.yml"
README = ROOT / "README.md"
PYTHON = sys.executable
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}

# Programs the documentation may quote that are not the project's own: checked for nothing but their name.
OUTSIDE_PROGRAMS = {"curl", "docker", "helm", "genai-perf", "perf_analyzer", "cat", "mkdir", "printf", "echo", "git",
                    "kubectl", "mkdocs", "cd", "source", "export"}
# Top-level folders whose paths, quoted in a command as something it reads, must exist.
PROJECT_DIRS = ("scripts", "deploy", "export", "client", "tests", "docs", "model_repository")
# Arguments that name what a command writes, so they need not exist beforehand.
OUTPUT_FLAGS = {"--out", "--json", "-o", "-d", "--state", ">", ">>"}
# Commands the documentation describes before they land; each with the issue that brings it. A pending command that
# answers --help is checked like any other; remove its entry when it has landed.
PENDING: dict[tuple[str, str], str] = {}  # e.g. {("export", "repository"): "lands with issue 21"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """The site's pages: every Markdown file under docs/ except the configuration folder (exclude_docs)."""
    return sorted(p for p in DOCS.rglob("*.md") if CONFIG.parent not in p.parents)


def documents() -> list[Path]:
    return [README, *pages()]


def fenced_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        i += 1
        if not opening:
            continue
        indent, fence, lang = len(opening.group(1)), opening.group(2), opening.group(3).lower()
        start, body = i, []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        i += 1
        yield Block(path, start, lang, "\n".join(body))


def blocks(*langs: str) -> list[Block]:
    return [b for path in documents() for b in fenced_blocks(path) if b.lang in langs]


# --- shell blocks into simple commands ----------------------------------------------------------------------------
def split(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def logical_lines(code: str) -> Iterator[list[str]]:
    """Each command line of a shell block as tokens: continuations joined, open quotes followed onto the next line,
    comments dropped, heredoc bodies skipped."""
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while True:
            if line.rstrip().endswith("\\") and i < len(lines):
                line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                continue
            try:
                tokens = split(line)
            except ValueError:  # a quotation that closes on a later line
                if i >= len(lines):
                    raise
                line += "\n" + lines[i]
                i += 1
                continue
            break
        if "<<" in tokens:
            delimiter = tokens[tokens.index("<<") + 1]
            while i < len(lines) and lines[i].strip() != delimiter:
                i += 1
            i += 1
        if tokens:
            yield tokens


def simple_commands(tokens: list[str]) -> Iterator[list[str]]:
    """A command line cut at |, &&, ||, ; and &; environment assignments in front dropped. A | inside a synopsis's
    [--this | --that] is an alternative, not a pipe."""
    command: list[str] = []
    depth = 0
    for token in [*tokens, ";"]:
        depth += token.count("[") - token.count("]")
        if token in {"|", "||", "&&", ";", "&", "(", ")"} and depth <= 0:
            while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                command = command[1:]
            if command:
                yield command
            command = []
        else:
            command.append(token)


@dataclass(frozen=True)
class Command:
    where: str
    tokens: tuple[str, ...]


def commands() -> list[Command]:
    found = []
    for block in blocks("bash", "sh", "shell", "console"):
        for line in logical_lines(block.code):
            for command in simple_commands(line):
                found.append(Command(block.where(), tuple(command)))
    return found


def flags(tokens: tuple[str, ...]) -> set[str]:
    """The long options a command line quotes, including those in [--optional FLAG] synopses."""
    out = set()
    for token in tokens:
        if token == "--":
            break
        out.update(re.findall(r"(?:^|\[|\|)(--[a-z][a-z0-9-]*)", token))
    return out


def read_paths(tokens: tuple[str, ...]) -> list[str]:
    """Project paths the command reads (not those it writes)."""
    if tokens[0] == "mkdir":
        return []
    paths = []
    for before, token in zip(("",) + tokens, tokens):
        if before in OUTPUT_FLAGS:
            continue
        for part in re.split(r"[:=,\[\]]", token):
            if re.match(rf"^(?:{'|'.join(PROJECT_DIRS)})/", part):
                paths.append(part.rstrip("/"))
    return paths


def git_ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


@functools.lru_cache(maxsize=None)
def help_text(*invocation: str) -> tuple[int, str]:
    done = subprocess.run([*invocation, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def python_target(tokens: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the invocation whose --help to ask, the tokens after it) for `python -m MODULE [SUB] ...` or `python X.py`."""
    invocation: tuple[str, ...]
    if tokens[1] == "-m":
        invocation, rest = (PYTHON, "-m", tokens[2]), tokens[3:]
        if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
            code, text = help_text(*invocation)
            choices = re.search(r"\{([\w,-]+)\}", text)
            if choices and rest[0] in choices.group(1).split(",") or (tokens[2], rest[0]) in PENDING:
                invocation, rest = (*invocation, rest[0]), rest[1:]
        return invocation, rest
    return (PYTHON, tokens[1]), tokens[2:]


def command_id(command: Command) -> str:
    return f"{command.where} {' '.join(command.tokens)[:60]}"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run([PYTHON, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG), "-d", str(site)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


# --- the site -----------------------------------------------------------------------------------------------------
def test_the_site_builds_strictly(built_site: Path) -> None:
    assert (built_site / "index.html").is_file()
    assert (built_site / "search" / "search_index.json").is_file()
    for page in pages():
        target = page.relative_to(DOCS).with_suffix("")
        html = built_site / ("index.html" if target.name == "index" else target / "index.html")
        assert html.is_file(), f"{page.relative_to(ROOT)} was not built"


def nav_files(nav: list) -> Iterator[str]:
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from nav_files(value)
        elif not re.match(r"^https?://", value):
            yield value


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    docs_dir = (CONFIG.parent / config["docs_dir"]).resolve()
    assert docs_dir == DOCS
    in_nav = list(nav_files(config["nav"]))
    assert len(in_nav) == len(set(in_nav)), "a page is in the nav twice"
    assert sorted(in_nav) == sorted(str(p.relative_to(DOCS)) for p in pages())
    site_dir = (CONFIG.parent / config["site_dir"]).resolve()
    assert git_ignored(str(site_dir.relative_to(ROOT))), "the site is built into a git-ignored folder"
    assert config["strict"] is True and config["validation"]["links"]["anchors"] == "warn"


def test_pages_embed_only_images_that_are_committed() -> None:
    for page in pages():
        for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            path = (page.parent / image).resolve()
            assert path.is_file(), f"{page.relative_to(ROOT)} embeds {image}, which is not there"
            assert not git_ignored(str(path.relative_to(ROOT))), f"{image} is git-ignored"


# --- the commands -------------------------------------------------------------------------------------------------
COMMANDS = commands()


def test_the_docs_quote_commands() -> None:
    programs = {c.tokens[0] for c in COMMANDS}
    assert {"scripts/demo.sh", "scripts/test.sh", "python"} <= programs
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.tokens[0] not in {"python", "python3"}],
                         ids=command_id)
def test_every_quoted_program_exists(command: Command) -> None:
    program = command.tokens[0]
    if program in {"sh", "bash"}:
        program = command.tokens[1]
    if program.startswith(("scripts/", "./scripts/", "deploy/")):
        script = ROOT / program
        assert script.is_file(), f"{command.where}: {program} does not exist"
        assert os.access(script, os.X_OK) or command.tokens[0] in {"sh", "bash"}, f"{program} is not executable"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{program} does not parse"
        source = script.read_text()
        if re.search(r"^\s*(-h\|)?--help\)", source, flags=re.M):  # the script answers --help itself
            code, text = help_text(str(script))
            assert code == 0, f"{program} --help failed:\n{text}"
            missing = flags(command.tokens) - set(re.findall(r"--[a-z][a-z0-9-]*", text))
            assert not missing, f"{command.where}: {program} --help does not list {sorted(missing)}"
    else:
        assert program in OUTSIDE_PROGRAMS, f"{command.where}: unknown program {program!r}"
    for path in read_paths(command.tokens):
        assert (ROOT / path).exists() or git_ignored(path), f"{command.where}: {path} does not exist"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.tokens[0] in {"python", "python3"}], ids=command_id)
def test_every_quoted_python_command_answers_help_with_its_flags(command: Command) -> None:
    invocation, rest = python_target(command.tokens)
    if len(invocation) == 2:
        assert (ROOT / invocation[1]).is_file(), f"{command.where}: {invocation[1]} does not exist"
    code, text = help_text(*invocation)
    pending = PENDING.get((invocation[2], invocation[3])) if len(invocation) == 4 else None
    if code != 0 and pending:
        pytest.skip(f"{' '.join(invocation[1:])} is documented ahead of its code: {pending}")
    assert code == 0, f"{command.where}: {' '.join(invocation[1:])} --help failed:\n{text[-2000:]}"
    missing = flags(tuple(rest)) - set(re.findall(r"--[a-z][a-z0-9-]*", text))
    assert not missing, f"{command.where}: {' '.join(invocation[1:])} --help does not list {sorted(missing)}"
    for path in read_paths(command.tokens):
        assert (ROOT / path).exists() or git_ignored(path), f"{command.where}: {path} does not exist"


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.where())
def test_python_blocks_compile_and_their_project_imports_resolve(block: Block) -> None:
    tree = compile(block.code, block.where(), "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in {"client", "export",
                                                                                              "dlm"}:
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{block.where()}: {node.module} has no {missing}"


# --- the README as a front page -----------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub give a heading of plain text and code."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def test_the_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:40])
    for needed in ("scripts/demo.sh", "scripts/test.sh", "python -m export repository", "docs/deploying.md"):
        assert needed in first_screen, f"{needed} is not on the README's first screen"
    for heading in ("Headline figures", "What has not run", "Documentation"):
        assert f"## {heading}" in lines, heading


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_inside_the_repository_lead_to_files_and_headings(document: Path) -> None:
    text = re.sub(r"^\s*```.*?^\s*```", "", document.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if ROOT not in file.parents and file != ROOT:
            continue  # outside the repository (the README's link to the shared design document)
        assert file.exists(), f"{document.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{document.relative_to(ROOT)} links to {target}: no such heading"


def test_the_mutation_scores_on_the_page_are_the_summarys() -> None:
    """docs/mutation.md's table is what `scripts/mutation.sh --summary` writes from docs/mutation/mutation.json: a
    row per module there, with its figures, and no row of a module it lacks."""
    import json

    report = json.loads((DOCS / "mutation" / "mutation.json").read_text())["modules"]
    page = (DOCS / "mutation.md").read_text()
    table = page.split("<!-- mutation-table: generated from docs/mutation/mutation.json -->")[1]
    table = table.split("<!-- end mutation-table -->")[0]
    rows = {cells[0].strip("`").removesuffix(".py"): cells[1:]
            for line in table.strip().splitlines()[2:]
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert set(rows) == set(report)
    for module, entry in report.items():
        checked = entry["total"] - entry.get("not_checked", 0)
        assert rows[module] == [str(entry["killed"]), str(entry["timeout"]),
                                f"{entry['survived']} ({entry['survived_equivalent']})", f"{checked} / {entry['total']}",
                                f"{entry['score']:.1%}", f"{entry['score_without_equivalent']:.1%}", entry["tested"]]
        # the equivalent survivors are those listed with a reason, and the others are named
        assert entry["survived"] == len(entry["survivors_equivalent"]) + len(entry["survivors_not_equivalent"])
