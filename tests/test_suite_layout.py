"""The test suite's own layout: what several test modules share lives in tests/helpers/ (or
conftest.py and its plugins), so no test module imports another. Importing a test module runs
its module-level set-up and re-registers its fixtures and tests where it is imported."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> list[str]:
    """The `tests/test_*` modules a file imports, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names, relative = [a.name for a in node.names], False
        elif isinstance(node, ast.ImportFrom):
            base, relative = node.module or "", node.level > 0
            names = [base] if base else []
            if base in ("", "tests"):  # `from tests import test_x`, `from . import test_x`
                names += [f"{base}.{a.name}" if base else a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            module = parts[0] if relative else parts[1] if parts[0] == "tests" and len(parts) > 1 else ""
            if module.startswith("test_"):
                found.append(("." if relative else "") + name)
    return found


def test_the_checker_sees_every_spelling(tmp_path: Path) -> None:
    f = tmp_path / "test_probe.py"
    f.write_text(
        "import tests.test_a\nfrom tests.test_b import x\nfrom tests import test_c, helpers\nfrom .test_d import y\n"
        "from . import test_e\ndef f():\n    from tests.test_f import z\n"
        "import tests.helpers.stacks\nfrom tests.conftest import photo\nfrom tests.helpers import videos\nimport test_utils_lib\n"
    )
    assert sorted(imported_test_modules(f)) == [".test_d", ".test_e", "tests.test_a", "tests.test_b", "tests.test_c", "tests.test_f"]


def test_no_test_module_imports_another() -> None:
    files = sorted([*TESTS.glob("test_*.py"), TESTS / "conftest.py", *(TESTS / "helpers").glob("*.py")])
    assert len(files) > 40
    offenders = {f.relative_to(TESTS).as_posix(): got for f in files if (got := imported_test_modules(f))}
    assert offenders == {}, f"move what these share into tests/helpers/ (fixtures: a plugin there, loaded by conftest.py): {offenders}"


SOURCE = ("api", "tasks", "workers", "storage", "client")
MAX_LINES = 520  # issue 16: modules small enough to read in one sitting (~500 lines)


def test_every_source_module_says_what_it_is_and_reads_in_one_sitting() -> None:
    """Each module of the service opens with a docstring whose first line is a whole sentence
    saying what the module is, and none is over ~500 lines (split along its seams instead)."""
    root = TESTS.parent
    checked = 0
    for d in SOURCE:
        for p in sorted((root / d).rglob("*.py")):
            text = p.read_text()
            doc = ast.get_docstring(ast.parse(text, str(p)))
            assert doc, f"{p.relative_to(root)} has no module docstring"
            first = doc.splitlines()[0].rstrip()
            assert first.endswith((".", ":", ")")), f"{p.relative_to(root)}: its first docstring line is not a whole sentence: {first!r}"
            assert len(text.splitlines()) <= MAX_LINES, f"{p.relative_to(root)} has {len(text.splitlines())} lines"
            checked += 1
    assert checked > 80
