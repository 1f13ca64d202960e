"""The import check (`scripts/check_imports.py`): the package is clean, and the
check fails on each kind of breach it promises to catch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_imports.py"


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()

LAYERS = (("top",), ("middle", "side"), ("bottom", ""))
"""Top first; `""` is the package root (`pkg/__init__.py`)."""


def make_package(root: Path, files: dict[str, str]) -> Path:
    """A throwaway package `pkg` under `root` with these files (path -> text)."""
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_the_real_package_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import circles, layers respected" in result.stdout


def test_downward_imports_pass(tmp_path: Path) -> None:
    package = make_package(
        tmp_path,
        {
            "top.py": "from pkg.middle import a\nimport pkg.bottom\n",
            "middle/__init__.py": "",
            "middle/a.py": "from pkg.middle import b\nfrom pkg import bottom\n",
            "middle/b.py": "from . import c\n",
            "middle/c.py": "import os\n",
            "bottom.py": "",
        },
    )
    assert checker.check(package, LAYERS) == []


@pytest.mark.parametrize(
    "how",
    [
        "from pkg.bottom_b import x\n",
        "import pkg.bottom_b\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.bottom_b import x\n",
        "def later():\n    from pkg.bottom_b import x\n    return x\n",
        "from . import bottom_b\n",
    ],
    ids=["from", "import", "type-checking", "function-local", "relative"],
)
def test_a_circle_fails_however_it_is_written(tmp_path: Path, how: str) -> None:
    package = make_package(
        tmp_path,
        {"bottom.py": how, "bottom_b.py": "from pkg.bottom import y\nx = 1\n"},
    )
    layers = (("bottom", "bottom_b", ""),)
    problems = checker.check(package, layers)
    assert any(line.startswith("import circle: pkg.bottom <-> pkg.bottom_b") for line in problems)


def test_a_three_module_circle_inside_one_package_fails(tmp_path: Path) -> None:
    package = make_package(
        tmp_path,
        {
            "middle/__init__.py": "",
            "middle/a.py": "from pkg.middle import b\n",
            "middle/b.py": "from pkg.middle import c\n",
            "middle/c.py": "from pkg.middle.a import thing\n",
        },
    )
    problems = checker.check(package, LAYERS)
    assert problems == ["import circle: pkg.middle.a <-> pkg.middle.b <-> pkg.middle.c"]


def test_an_upward_import_fails(tmp_path: Path) -> None:
    package = make_package(
        tmp_path,
        {"top.py": "", "bottom.py": "def f():\n    from pkg import top\n    return top\n"},
    )
    assert checker.check(package, LAYERS) == ["pkg.bottom imports pkg.top: a higher layer"]


def test_a_sibling_in_the_same_layer_fails(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"middle.py": "import pkg.side\n", "side.py": ""})
    assert checker.check(package, LAYERS) == [
        "pkg.middle imports pkg.side: a sibling in the same layer"
    ]


def test_a_package_with_no_layer_is_reported(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"stray.py": ""})
    assert checker.check(package, LAYERS) == [
        "pkg.stray: its package 'stray' has no layer in LAYERS"
    ]


def test_the_command_exits_1_with_a_report(tmp_path: Path) -> None:
    package = make_package(
        tmp_path, {"protocol.py": "import pkg.server\n", "server.py": "import pkg.protocol\n"}
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(package)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "import circle: pkg.protocol <-> pkg.server" in result.stdout
    assert "pkg.protocol imports pkg.server: a higher layer" in result.stdout
