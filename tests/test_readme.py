"""Every ```python block of README.md runs, so the examples stay true.

Each block runs on its own, in a fresh namespace, in a temporary working directory (files it writes go there),
in README order. Blocks are plain scripts: they hold their own imports and asserts. The environment variables
torchrun sets for a one-process run (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) are set, so a distributed
example runs as rank 0 of 1. A line ``<!-- test: slow -->`` right above a block's fence marks its test slow.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^(?P<marker><!-- test: slow -->\n)?```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks() -> list:
    text = README.read_text(encoding="utf-8")
    params = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        marks = [pytest.mark.slow] if match["marker"] else []
        params.append(pytest.param(match["code"], line, marks=marks, id=f"README.md:{line}"))
    return params


def test_readme_has_python_examples():
    assert len(_blocks()) >= 3, "README.md should hold the quick starts and the distributed example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("code", "line"), _blocks())
def test_readme_block_runs(code, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    # The block's line numbers in tracebacks are README.md's.
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__main__"})  # noqa: S102 (the README's own code)
