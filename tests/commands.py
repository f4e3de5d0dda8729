"""Commands the tests run in a subprocess: each under a time limit, killed with every process it started when the limit
passes, and a failure that says which command hung or failed and what it printed."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# After the kill, how long to wait for the output still in the pipe.
DRAIN_SECONDS = 10


@dataclass
class Finished:
    """How a command ended: its exit status (``None`` when it was killed), what it printed (stdout and stderr in one
    stream, in the order written) and, if it was killed, why."""

    what: str
    returncode: int | None
    output: str
    hung: str | None = None

    @property
    def why(self) -> str | None:
        """``None`` if the command exited with status 0; otherwise how it ended."""
        if self.hung is None and self.returncode == 0:
            return None
        return self.hung or f"exited with status {self.returncode}"

    def failure(self, lines: int = 80) -> str | None:
        """``None`` if the command exited with status 0; otherwise how it ended and the end of its output."""
        if self.why is None:
            return None
        tail = "\n".join(self.output.splitlines()[-lines:])
        return f"{self.what} {self.why}; the end of its output:\n{tail}"

    def check(self) -> None:
        failure = self.failure()
        assert failure is None, failure


def run_command(
    command: list[str],
    *,
    what: str,
    timeout: float,
    cwd: Path,
    env: dict[str, str] | None = None,
    progress: str | None = None,
) -> Finished:
    """Runs ``command`` in a session of its own and kills the session once ``timeout`` seconds pass: since the start,
    or, with ``progress``, since the last line of output containing it (a command that reports each stage it finishes
    gets ``timeout`` per stage). ``what`` names the command in failures."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    output: list[str] = []
    deadline = started + timeout
    hung = None

    def kill(why: str) -> str:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended just now
            pass
        return f"hung: killed after {timeout:.0f} s {why} ({time.monotonic() - started:.0f} s in all)"

    while hung is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            if process.poll() is None:
                hung = kill(f"since its last line with {progress!r}" if progress else "since it started")
            else:  # it ended, but a process it started still holds its output open
                kill("")
            reader.join(DRAIN_SECONDS)
            line = None
        if line is None:
            break
        output.append(line)
        if progress is not None and progress in line:
            deadline = time.monotonic() + timeout
    while not lines.empty():  # what the pipe still held when the command was killed
        output.append(lines.get() or "")
    try:
        returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # its output closed, but it did not end
        hung = kill("with its output closed")
        returncode = process.wait()
    return Finished(what, None if hung else returncode, "".join(output), hung)
