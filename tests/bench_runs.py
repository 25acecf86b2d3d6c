"""Running a ``bench/`` script as a user runs it, for the tests of the scripts
(``test_bench_tools.py``, ``test_bench_targets.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# Variables that would configure the gateway's providers or server behind the test's back.
_CONFIG_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENROUTER_API_KEY", "OLLAMA_HOST")


def bench_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in _CONFIG_VARIABLES and not k.startswith("PROXY_")}


def bench(module: str, *args: str, timeout: float) -> Any:
    """``python -m bench.<module> *args``; its stdout parsed as JSON. On overrun: SIGINT
    (the script unwinds and stops its children), 15 s, then SIGKILL, and the test fails."""
    argv = [sys.executable, "-m", f"bench.{module}", *args]
    with subprocess.Popen(argv, cwd=REPO, env=bench_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"{' '.join(argv[1:])} overran {timeout:g} s:\n{err.decode()[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(argv[1:])} exited {proc.returncode}:\n" \
                                 f"{err.decode()[-3000:]}"
    return json.loads(out)
