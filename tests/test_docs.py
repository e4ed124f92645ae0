"""The docs stay true to the tree: every path, module, dotted name and command that
README.md, docs/ and csrc/README.md name in code spans exists."""

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from fastguide.apps import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "csrc" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("fastguide/", "kernels/", "csrc/", "tests/", "benchmarks/", "tools/", "docs/", ".ci/")
BUILT_ON_DEMAND = {"fastguide._C"}  # the CUDA extension, present once built
SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".sh", ".md", ".toml", ".png", ".safetensors", ".json")


def code_spans(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", lambda block: block.group(0).replace("`", ""), doc.read_text(), flags=re.S)
    blocks = re.findall(r"```\w*\n(.*?)```", doc.read_text(), flags=re.S)
    return re.findall(r"`([^`\n]+)`", text) + [line for block in blocks for line in block.splitlines()]


def named_paths(doc: Path) -> set[str]:
    found = set()
    for span in code_spans(doc):
        for word in re.findall(r"[\w./-]+", span):
            word = word.rstrip(".,:")
            if word.startswith(TOP) or (word.endswith(SUFFIXES) and "/" not in word and "*" not in word):
                found.add(word)
    return found


def _project_files() -> set[str]:
    skip = {".git", ".venv", ".ci", "__pycache__", "build", "results"}
    return {p.name for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)}


def exists(word: str, doc: Path, names: set[str]) -> bool:
    if word.startswith(("fastguide/weights/", "../")) or word.startswith(".") and "/" not in word:
        return True  # shipped weights are checked by tests/apps; ".cu" is a suffix
    if "/" not in word:  # a file named within a folder the text is about
        return word in names
    return any((base / word).exists() for base in (ROOT, doc.parent))


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_named_path_exists(doc):
    names = _project_files()
    missing = sorted(word for word in named_paths(doc) if not exists(word, doc, names))
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            obj = importlib.import_module(module_name)
            for attribute in parts[cut:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_named_module_and_dotted_name_resolves(doc):
    names = set()
    for span in code_spans(doc):
        names.update(re.findall(r"python3? -m ([\w.]+)", span))
        names.update(n.rstrip(".") for n in re.findall(r"\b(fastguide(?:\.\w+)+)", span))
    names -= BUILT_ON_DEMAND
    unresolved = sorted(n for n in names if not _resolves(n))
    assert not unresolved, f"{doc.relative_to(ROOT)} names modules or attributes that do not exist: {unresolved}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_named_command_exists(doc):
    parser = cli.build_parser()
    commands = {
        name
        for action in parser._actions
        for name in (getattr(action, "choices", None) or {})
        if isinstance(action, argparse._SubParsersAction)
    }
    invoked = r"(?:^|&& |; |python3? -m )fastguide (\w+)"  # a command line, not "from fastguide import"
    named = {m for span in code_spans(doc) for m in re.findall(invoked, span.strip())}
    assert named <= commands, f"{doc.relative_to(ROOT)} names commands fastguide lacks: {sorted(named - commands)}"
