"""launcher.train ends its process without the interpreter's teardown (where a finished gloo rank can abort),
but with everything a normal exit does for Python: exit code, message, threads, atexit handlers, output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import atexit, sys, threading, time
from launcher.common import exit_without_teardown

class Finalized:  # a module global: the interpreter's teardown would call this
    def __del__(self):
        print("module teardown ran", flush=True)

keep = Finalized()
atexit.register(lambda: print("atexit ran", flush=True))

def late():
    time.sleep(0.3)
    print("thread finished", flush=True)

def main():
    threading.Thread(target=late).start()
    print("buffered output", end="")  # no newline, no flush: still written
    {body}

exit_without_teardown(main)
"""


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM.format(body=body)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("body", "code"), [("pass", 0), ("sys.exit(75)", 75), ("sys.exit(None)", 0)])
def test_the_exit_code_threads_atexit_and_output_survive_and_the_teardown_is_skipped(body, code):
    result = _run(body)
    assert result.returncode == code, result.stderr
    assert result.stdout.startswith("buffered output")
    assert "thread finished" in result.stdout and "atexit ran" in result.stdout
    assert result.stdout.index("thread finished") < result.stdout.index("atexit ran")  # as Python orders them
    assert "module teardown ran" not in result.stdout


def test_a_message_passed_to_sys_exit_is_printed_with_exit_code_1():
    result = _run('sys.exit("error: data.path=/x: no such directory")')
    assert result.returncode == 1
    assert result.stderr.strip() == "error: data.path=/x: no such directory"
