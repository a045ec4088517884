"""pyproject.toml installs every package directory, under the one ``moeserve`` namespace."""

from __future__ import annotations

import ast
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("server", "models", "devtools")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_directory_is_installed_under_moeserve() -> None:
    on_disk = {
        "moeserve." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOPS
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(_setuptools()["packages"]) == on_disk
    assert _setuptools()["package-dir"] == {f"moeserve.{top}": top for top in TOPS}


def test_no_source_imports_the_bare_top_level_names() -> None:
    # A bare `import server` would load a second copy of a module beside moeserve.server's.
    files = [p for top in (*TOPS, "tests", "bench") for p in (ROOT / top).rglob("*.py")]
    bare = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bare += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in TOPS]
    assert bare == []


def test_the_readme_library_example_runs_as_written(capsys) -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```py\n(.*?)^```", readme, flags=re.M | re.S)
    assert blocks, "the README's library example (a ```py block) is gone"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "qwen2_moe" in capsys.readouterr().out
