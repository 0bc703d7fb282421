"""The architecture as docs/architecture.md draws it, kept so by tests.

The import contracts live in pyproject.toml (``[tool.importlinter]``): the CLI on top, the benchmarks,
the scenarios, the three roles side by side, ``common`` at the bottom, and no import cycle inside a
package, counting imports made inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "broker", "edge_agent", "cloud_agent", "scenarios", "bench", "mistnet")
MAX_FUNCTION_LINES = 60


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def long_functions(root: Path) -> list[str]:
    """``path:line name (N lines)`` for every function longer than the limit."""
    found = []
    for path in sorted(p for package in PACKAGES for p in (root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_sixty_lines() -> None:
    assert long_functions(ROOT) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "long.py").write_text(f"def too_long():\n{body}")
    assert long_functions(tmp_path) == [f"common/long.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"]
