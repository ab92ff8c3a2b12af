"""Shared test helpers: run the installed commands as a user would, find the real data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest -n (xdist) each worker, and every command it starts, gets one thread: N workers
# with torch's default of one thread per core each would oversubscribe the cores, and
# OpenMP's spinning threads then slow everything down many times over.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Tests that need the real datasets read them from here (.ci/run sets it to ../shared/data).
DATA_ENV = "RESNET_CLI_TEST_DATA"


def command(name: str) -> str:
    """The console script installed beside this Python (the venv's), else on PATH."""
    exe = BIN / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def run_cli(name: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    # Users see one-line errors unless they ask for tracebacks; so do the tests.
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    proc = subprocess.run([command(name), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def call_main(main, name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A command's main() in this process (cheaper than a subprocess for the many bad-input cases)."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def real_data() -> Path:
    root = os.environ.get(DATA_ENV)
    if not root or not (Path(root) / "FashionMNIST" / "raw").is_dir():
        why = f"real datasets not available (set {DATA_ENV} to a folder with FashionMNIST/raw)"
        if os.environ.get("CI") == "true":  # CI has them: a skip there would hide a broken set-up
            pytest.fail(why)
        pytest.skip(why)
    return Path(root)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Extracted datasets go to a per-session cache, never into the shared data folder.
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
