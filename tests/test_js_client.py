"""The JavaScript client's tests (`tests/js/*.test.mjs`), run by Node's own
test runner as a subprocess, and its TypeScript declarations, checked by
`tsc --strict`.

The JS tests start real `python -m apix_trio serve` processes (with this
interpreter, via `PYTHON`) and a real `redis-server`; see tests/js/server.mjs.
`npm ci` installs the dev dependencies (`ws`, `typescript`) first when
node_modules lacks them. A failure shows node's whole output.

`JS_TEST_FILES` is the explicit list run here (`promtext.test.mjs` tests the
dashboard's Prometheus text helpers; `presence_state.test.mjs` presence and
state end to end).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JS_DIR = REPO / "tests" / "js"
JS_TEST_FILES = [
    "unit.test.mjs",
    "client.test.mjs",
    "resume.test.mjs",
    "promtext.test.mjs",
    "presence_state.test.mjs",
]
NODE = shutil.which("node")
NPM = shutil.which("npm")
NODE_TIMEOUT = 120.0
NPM_TIMEOUT = 300.0


def setup_module() -> None:
    assert NODE is not None and NPM is not None, (
        "node and npm are needed (scripts/test.sh installs them when missing)"
    )


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("APIX_")}
    env["PYTHON"] = sys.executable
    return env


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _show(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """node_modules with the dev dependencies, installed by `npm ci` when missing."""
    modules = REPO / "node_modules"
    if not (modules / "ws" / "package.json").is_file() or not (modules / ".bin" / "tsc").exists():
        assert NPM is not None
        result = _run([NPM, "ci", "--no-audit", "--no-fund"], NPM_TIMEOUT)
        if result.returncode != 0:
            pytest.fail("npm ci failed:\n" + _show(result), pytrace=False)
    return modules


@pytest.mark.timeout(NODE_TIMEOUT + NPM_TIMEOUT + 30)
def test_js_client(node_modules: Path) -> None:
    assert NODE is not None
    files = [str(JS_DIR / name) for name in JS_TEST_FILES]
    result = _run([NODE, "--test", "--test-reporter=spec", *files], NODE_TIMEOUT)
    if result.returncode != 0:
        pytest.fail("node --test failed:\n" + _show(result), pytrace=False)


@pytest.mark.timeout(NODE_TIMEOUT + NPM_TIMEOUT + 30)
def test_js_type_declarations(node_modules: Path) -> None:
    tsc = node_modules / ".bin" / "tsc"
    result = _run(
        [str(tsc), "--noEmit", "--strict", "-p", str(JS_DIR / "tsconfig.json")], NODE_TIMEOUT
    )
    if result.returncode != 0:
        pytest.fail("tsc found errors in apix.d.ts or its usage:\n" + _show(result), pytrace=False)
