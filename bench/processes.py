"""Start the Procfile's processes as the bench needs them; read their memory and CPU.

Commands come from the Procfile itself, so the bench measures the flags that
production runs. Memory and CPU are read from /proc (Linux only).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# BENCH_PROCFILE measures other worker flags without editing the real Procfile.
PROCFILE = Path(os.environ.get("BENCH_PROCFILE", ROOT / "Procfile"))
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def procfile_command(name: str, env: Mapping[str, str]) -> list[str]:
    """Return the Procfile's command for process `name`, variables expanded."""
    for line in PROCFILE.read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            expanded = _VARIABLE.sub(
                lambda match: env.get(match[1] or match[3]) or match[2] or "",
                command.strip(),
            )
            return shlex.split(expanded)
    raise SystemExit(f"The Procfile has no {name!r} process.")


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """Return `args` with the value after `option` replaced (added if absent)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


def _python_entry(args: list[str]) -> list[str]:
    # This interpreter's celery and gunicorn, whatever PATH says.
    if args[0] in {"celery", "gunicorn"}:
        return [sys.executable, "-m", *args]
    return args


@dataclass
class Process:
    """A process the bench started, in a session of its own, logging to a file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def log_text(self) -> str:
        """Return what the process logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 15) -> None:
        """Stop the process and its children: SIGTERM, then SIGKILL."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


def start(name: str, args: list[str], env: Mapping[str, str], logs: Path) -> Process:
    """Start `args` from the repository root with `env` added to this environment."""
    log = logs / f"{name}.log"
    popen = subprocess.Popen(
        _python_entry(args),
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Process(name, popen, log)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Return the ids of a process's direct children."""
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids += [int(child) for child in (task / "children").read_text().split()]
    return sorted(set(pids))


def _status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    """Return a process's resident memory in MiB."""
    return round(_status_kb(pid, "VmRSS") / 1024, 1)


def peak_rss_mb(pid: int) -> float:
    """Return the highest resident memory since start (or the last reset), in MiB."""
    return round(_status_kb(pid, "VmHWM") / 1024, 1)


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's peak resident memory to its current value, if allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """Return CPU time of a process and of the children it has waited for."""
    try:
        fields_after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except OSError:
        return 0.0
    values = fields_after_name.split()
    # utime, stime, cutime, cstime are fields 14-17 of stat(5); 3 is values[0].
    return sum(int(values[index]) for index in range(11, 15)) / _CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """Return the CPU time all cores spent busy since boot."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in first[:8]
    )
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


@dataclass
class ProcessTree:
    """A started process and the children it forks (gunicorn and Celery workers)."""

    process: Process
    cpu_marks: dict[int, float] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        """Return `main` and `child-N` pids."""
        pids = {"main": self.process.pid}
        for index, pid in enumerate(children(self.process.pid), 1):
            pids[f"child-{index}"] = pid
        return pids

    def rss(self) -> dict[str, float]:
        """Return resident memory in MiB of the process and of each child."""
        sizes = {}
        for role, pid in self.pids().items():
            with contextlib.suppress(OSError):
                sizes[role] = rss_mb(pid)
        return sizes

    def mark_cpu(self) -> None:
        """Remember CPU time now, for cpu_since_mark()."""
        self.cpu_marks = {pid: cpu_seconds(pid) for pid in self.pids().values()}

    def cpu_since_mark(self) -> float:
        """Return CPU seconds the tree spent since mark_cpu()."""
        return round(
            sum(
                cpu_seconds(pid) - self.cpu_marks.get(pid, 0.0)
                for pid in self.pids().values()
            ),
            2,
        )


def command_cpu_seconds(commands: tuple[str, ...]) -> float:
    """Return CPU time of every process whose command name is one of `commands`."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            if text[text.index("(") + 1 : text.rindex(")")] in commands:
                total += cpu_seconds(int(stat.parent.name))
    return total


SERVICES = {"redis": ("redis-server",), "postgres": ("postgres",)}


class CpuMeter:
    """CPU seconds spent by each part of the stack between start() and read()."""

    def __init__(self, trees: dict[str, ProcessTree], pids: dict[str, int]) -> None:
        self._trees = trees
        self._pids = pids
        self._marks: dict[str, float] = {}

    def start(self) -> None:
        """Remember where every counter stands."""
        for tree in self._trees.values():
            tree.mark_cpu()
        self._marks = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        for name, commands in SERVICES.items():
            self._marks[name] = command_cpu_seconds(commands)
        self._marks["machine"] = machine_cpu_seconds()

    def read(self) -> dict[str, float]:
        """Return CPU seconds per part since start(), and the rest of the machine."""
        spent = {name: tree.cpu_since_mark() for name, tree in self._trees.items()}
        for name, pid in self._pids.items():
            spent[name] = cpu_seconds(pid) - self._marks[name]
        for name, commands in SERVICES.items():
            spent[name] = command_cpu_seconds(commands) - self._marks[name]
        machine = machine_cpu_seconds() - self._marks["machine"]
        spent["rest (kernel, other processes)"] = machine - sum(spent.values())
        spent["machine"] = machine
        return {name: round(value, 2) for name, value in spent.items()}
