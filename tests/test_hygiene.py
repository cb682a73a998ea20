"""The import contract and the file-level rules: no side effects at import, one reader of the
environment, sections in order, short functions and lines, a clean linter, few open experiments."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg

SOURCE_PATH = Path(tg.__file__).resolve()
SOURCE = SOURCE_PATH.read_text(encoding="utf-8")

# Runs in a fresh interpreter: GPU-only packages are made unimportable, then train_gpt is imported
# and the side effects it must not have are reported as JSON on the last line.
IMPORT_PROBE = r"""
import sys, time
for name in ("flash_attn_interface", "flash_attn", "triton"):
    sys.modules[name] = None          # any `import name` now raises ImportError
t0, c0 = time.perf_counter(), time.process_time()
import train_gpt  # torch included
wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
import json, torch, torch.distributed as dist
print(json.dumps({"wall_s": wall_s, "cpu_s": cpu_s, "cuda_initialized": torch.cuda.is_initialized(),
                  "dist_initialized": dist.is_available() and dist.is_initialized(),
                  "fa3": train_gpt._fa3_varlen is not None}))
"""


def test_import_has_no_side_effects(tmp_path):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(SOURCE_PATH.parent),
        TMPDIR=str(tmp),
        PYTHONDONTWRITEBYTECODE="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        cwd=cwd,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"import printed something: {proc.stdout!r}"
    assert proc.stderr == "", f"import wrote to stderr: {proc.stderr!r}"
    report = json.loads(lines[0])
    assert not report["cuda_initialized"] and not report["dist_initialized"] and not report["fa3"]
    # CPU time, torch included (wall time varies with the machine's load)
    assert report["cpu_s"] < 5.0
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


def test_environment_is_read_only_in_main():
    """`os.environ` appears once, as main()'s default mapping; everything else gets the mapping."""
    lines = [i for i, line in enumerate(SOURCE.splitlines(), 1) if "os.environ" in line]
    assert len(lines) == 1
    main_start = SOURCE.index("\ndef main(")
    main_end = SOURCE.index('\nif __name__ == "__main__":', main_start)  # main() is the last def
    assert "os.environ" in SOURCE[main_start:main_end]
    assert "os.getenv" not in SOURCE


MAX_FUNCTION_LINES = 60  # a function (or method) of train_gpt.py, decorators and docstring included
LINE_LIMIT = 100  # the line-length of pyproject.toml's ruff configuration


def function_lengths(source: str) -> dict[str, int]:
    """Lines of every function and method, by qualified name."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                lengths[prefix + child.name] = child.end_lineno - start + 1
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return lengths


def test_no_function_is_longer_than_the_limit():
    lengths = function_lengths(SOURCE)
    assert {k: n for k, n in lengths.items() if n > MAX_FUNCTION_LINES} == {}
    assert lengths["main"] <= 60  # main() is the table of contents


def test_no_line_over_the_limit():
    """Every Python file of the repository (ruff's E501 checks this too, when ruff is installed)."""
    root = SOURCE_PATH.parent
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=root, capture_output=True, text=True)
    paths = [root / name for name in files.stdout.split()] or [SOURCE_PATH]
    long = [
        f"{path.relative_to(root)}:{i}"
        for path in paths
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > LINE_LIMIT
    ]
    assert long == []


def test_ruff_lint_and_format_are_clean():
    """pyproject.toml configures the linter and the formatter; CI fails on either."""
    pytest.importorskip("ruff")  # requirements-dev.txt installs it
    root = SOURCE_PATH.parent
    for args in (["check", "."], ["format", "--check", "."]):
        cmd = [sys.executable, "-m", "ruff", *args]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def section_starts(source: str) -> list[tuple[int, int]]:
    """(line, n) of every section banner `# n. Title`."""
    lines = enumerate(source.splitlines(), 1)
    return [(i, int(m[1])) for i, line in lines if (m := re.match(r"# (\d+)\. ", line))]


def top_level_names(node: ast.stmt) -> set[str]:
    """The module-level names a statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.Try):  # guarded imports
        return set().union(*(top_level_names(n) for n in node.body + node.handlers[0].body))
    return set()


def later_section_references(source: str) -> list[tuple[int, str]]:
    """(line, name) wherever a statement of section k reads a module-level name that a later
    section defines (the `if __name__ == "__main__":` block is exempt)."""
    tree, starts = ast.parse(source), section_starts(source)

    def section(line: int) -> int:
        return max((n for start, n in starts if start <= line), default=0)

    home: dict[str, int] = {}
    for node in tree.body:
        for name in top_level_names(node):
            home.setdefault(name, section(node.lineno))
    found = []
    for node in tree.body:
        if isinstance(node, ast.If):
            continue
        args = [a for n in ast.walk(node) if isinstance(n, ast.arguments) for a in ast.walk(n)]
        local = {a.arg for a in args if isinstance(a, ast.arg)}
        local |= {
            n.id
            for n in ast.walk(node)
            if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
        }
        local -= top_level_names(node)
        for n in ast.walk(node):
            name = getattr(n, "id", None)
            if (
                isinstance(n, ast.Name)
                and name not in local
                and home.get(name, 0) > section(n.lineno)
            ):
                found.append((n.lineno, name))
    return found


def test_no_section_uses_a_later_one():
    """Sections are in lifecycle order and own their code: a definition uses only names defined in
    its own section or an earlier one, so the file reads top to bottom."""
    assert [int(m[1]) for m in re.finditer(r"^# (\d+)\. ", SOURCE, re.M)] == list(range(1, 11))
    assert later_section_references(SOURCE) == []


def test_later_section_detector_finds_the_pattern():
    source = (
        "# 1. First\n"
        "def f(x):\n"
        "    return g(x)\n"
        "# 2. Second\n"
        "def g(x):\n"
        "    g = 1\n"
        "    return f(x) + g\n"
    )
    assert later_section_references(source) == [(3, "g")]


def test_open_experiment_markers():
    assert SOURCE.count("EXPERIMENT(") <= 5


def test_dev_requirements_install_every_optional_test_dependency():
    """CI installs requirements-dev.txt and runs every test: each package a test imports through
    pytest.importorskip is listed there, and only tests/test_gpu.py may skip (no CUDA)."""
    root = SOURCE_PATH.parent
    tests = {p.name: p.read_text(encoding="utf-8") for p in (root / "tests").glob("test_*.py")}
    wanted = {
        m.split(".")[0]
        for text in tests.values()
        for m in re.findall(r'importorskip\("([\w.]+)"', text)
    }
    lines = (root / "requirements-dev.txt").read_text().splitlines()
    listed = {
        re.split(r"[<>=\s#]", line.strip())[0].lower()
        for line in lines
        if line.strip() and line[0] != "#"
    }
    assert wanted and wanted <= listed
    skips = [
        name
        for name, text in tests.items()
        if re.search(r"pytest\.mark\.skipif\(|pytest\.skip\(", text)
    ]
    assert skips == ["test_gpu.py"]
