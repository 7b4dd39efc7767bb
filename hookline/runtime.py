"""Agent runtimes: what turns rendered instructions into a result.

One implementation now, the command runner. Another runtime only has to offer
`run`; the agent pool does not care how the work is done.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# GitHub refuses comments over 65,536 characters; leave room for a footer.
MAX_RESULT_CHARS = 60_000
# Never handed to an agent: it runs code the request asked for.
_WITHHELD = (
    "GITHUB_APP_WEBHOOK_SECRET",
    "GITHUB_APP_PRIVATE_KEY",
    "GITHUB_APP_PRIVATE_KEY_PATH",
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
)


class AgentStatus(enum.StrEnum):
    FINISHED = "finished"
    ERROR = "error"


@dataclass(frozen=True)
class AgentRequest:
    """One run: the instructions, and context the agent may read from its env."""

    instructions: str
    context: Mapping[str, str]
    timeout: float


@dataclass(frozen=True)
class AgentOutcome:
    """How a run ended: the result to post, or why there is none."""

    status: AgentStatus
    output: str = ""
    error: str = ""


class AgentRuntime(Protocol):
    def run(
        self,
        request: AgentRequest,
        heartbeat: Callable[[], None],
        heartbeat_every: float,
    ) -> AgentOutcome:
        """Run the agent to its end, calling `heartbeat` while it works."""
        ...


class CommandRuntime:
    """Run a command with the instructions on stdin; its stdout is the result."""

    def __init__(self, command: list[str]) -> None:
        self.command = command

    def run(
        self,
        request: AgentRequest,
        heartbeat: Callable[[], None],
        heartbeat_every: float,
    ) -> AgentOutcome:
        environment = {
            name: value for name, value in os.environ.items() if name not in _WITHHELD
        }
        environment.update(request.context)
        try:
            process = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            return AgentOutcome(AgentStatus.ERROR, error=f"agent did not start: {exc}")

        deadline = time.monotonic() + request.timeout
        stdin: str | None = request.instructions
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(process)
                return AgentOutcome(
                    AgentStatus.ERROR,
                    error=f"agent timed out after {request.timeout:g} s",
                )
            try:
                stdout, stderr = process.communicate(
                    stdin, timeout=min(heartbeat_every, remaining)
                )
                break
            except subprocess.TimeoutExpired:
                # communicate() keeps what was read so far; input goes only once.
                stdin = None
                heartbeat()

        if process.returncode != 0:
            log.warning("agent.failed", extra={"exit_code": process.returncode})
            # The agent may print anything, secrets included: only at DEBUG.
            log.debug("agent.stderr", extra={"stderr": stderr[-2000:]})
            return AgentOutcome(
                AgentStatus.ERROR,
                error=f"agent exited with code {process.returncode}",
            )
        return AgentOutcome(AgentStatus.FINISHED, output=_truncate(stdout.strip()))


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def _truncate(output: str) -> str:
    if len(output) <= MAX_RESULT_CHARS:
        return output or "(the agent finished without output)"
    return output[:MAX_RESULT_CHARS] + "\n\n… (output truncated)"


DEMO_AGENT = [sys.executable, "-m", "hookline.demo_agent"]


def runtime_for(agent_command: str) -> AgentRuntime:
    """Return the command runner for HOOKLINE_AGENT_COMMAND, or the demo agent."""
    return CommandRuntime(shlex.split(agent_command) if agent_command else DEMO_AGENT)
