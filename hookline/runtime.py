"""Agent runtimes: what turns rendered instructions into a result.

A runtime works on one turn of a conversation at a time: it gets the transcript
and answers the last message, by finishing, by asking the user a question, or
with an error. The agent pool does not care how the work is done.
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

from config.settings import ConfigError, Settings

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
    AWAITING_INPUT = "awaiting_input"
    ERROR = "error"


class Purpose(enum.StrEnum):
    """Why the runtime is asked: to work on a turn, or to sum up its progress."""

    TURN = "turn"
    SUMMARY = "summary"


@dataclass(frozen=True)
class Message:
    """One message of a conversation's transcript."""

    role: str  # "user", "agent", or "hookline" for Hookline's own requests
    text: str
    author: str = ""


@dataclass(frozen=True)
class AgentRequest:
    """One turn: the transcript so far, ending with the message to answer.

    `runtime_ref` is what an earlier turn's outcome named as the runtime's own id
    for this conversation (a remote runtime keeps state; the command runner
    does not, and reads the whole transcript each turn).
    """

    conversation_id: str
    messages: tuple[Message, ...]
    context: Mapping[str, str]
    timeout: float
    runtime_ref: str | None = None
    purpose: Purpose = Purpose.TURN
    # A runtime that creates state of its own reports its id here as soon as it
    # has one, so that a turn taken over after a crash does not create it twice.
    on_ref: Callable[[str], None] | None = None


@dataclass(frozen=True)
class AgentOutcome:
    """How a turn ended: the reply to post, or why there is none."""

    status: AgentStatus
    output: str = ""
    error: str = ""
    runtime_ref: str | None = None


# Returned by a runtime whose heartbeat said the conversation is no longer its own.
STOPPED_ERROR = "the conversation was stopped"


class AgentRuntime(Protocol):
    def run(
        self,
        request: AgentRequest,
        heartbeat: Callable[[], bool],
        heartbeat_every: float,
    ) -> AgentOutcome:
        """Work on the request's last message until the agent finishes or asks.

        Call `heartbeat` at least every `heartbeat_every` seconds; when it
        returns False the conversation was stopped: give up at once and return
        an ERROR outcome with STOPPED_ERROR.
        """
        ...

    def stop(self, runtime_ref: str) -> None:
        """Stop the runtime's side of a conversation, if it keeps one."""
        ...


# The command runner's convention: this exit code means "I have a question".
ASK_EXIT_CODE = 3


def transcript(messages: tuple[Message, ...]) -> str:
    """Write a transcript as the text a command agent reads on stdin.

    The first message (the rendered instructions) stands alone; later ones are
    headed by who wrote them, so an agent can tell its replies from new input.
    """
    if not messages:
        return ""
    parts = [messages[0].text]
    for message in messages[1:]:
        who = (
            f"user {message.author}".strip() if message.role == "user" else message.role
        )
        parts.append(f"--- {who} ---\n{message.text}")
    return "\n\n".join(parts)


class CommandRuntime:
    """Run a command with the transcript on stdin; its stdout is the reply.

    Exit 0: finished, stdout is the result. Exit 3 (ASK_EXIT_CODE): the agent
    asks the user something, stdout is the question. Anything else: an error.
    The command runs once per turn and keeps no state between turns.
    """

    def __init__(self, command: list[str]) -> None:
        self.command = command

    def stop(self, runtime_ref: str) -> None:
        # Nothing outlives a turn: the running process is killed by `run` itself
        # when its heartbeat reports the stop.
        return None

    def run(
        self,
        request: AgentRequest,
        heartbeat: Callable[[], bool],
        heartbeat_every: float,
    ) -> AgentOutcome:
        environment = {
            name: value for name, value in os.environ.items() if name not in _WITHHELD
        }
        environment.update(request.context)
        environment["HOOKLINE_PURPOSE"] = request.purpose.value
        environment["HOOKLINE_TURN"] = str(
            sum(1 for message in request.messages if message.role == "user")
        )
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
        stdin: str | None = transcript(request.messages)
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
                if not heartbeat():
                    _kill_group(process)
                    return AgentOutcome(AgentStatus.ERROR, error=STOPPED_ERROR)

        if process.returncode == ASK_EXIT_CODE:
            return AgentOutcome(
                AgentStatus.AWAITING_INPUT, output=_truncate(stdout.strip())
            )
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


def runtime_for(config: Settings) -> AgentRuntime:
    """Return the runtime HOOKLINE_RUNTIME names: `command` (default) or `openhands`.

    The command runner runs HOOKLINE_AGENT_COMMAND, or the demo agent if unset.
    The OpenHands runtime talks to the server at OPENHANDS_URL, which it needs.
    """
    if config.HOOKLINE_RUNTIME == "command":
        command = config.HOOKLINE_AGENT_COMMAND
        return CommandRuntime(shlex.split(command) if command else DEMO_AGENT)
    if config.HOOKLINE_RUNTIME == "openhands":
        if not config.OPENHANDS_URL:
            raise ConfigError(
                "OPENHANDS_URL is not set: the openhands runtime needs the URL of "
                "the OpenHands server."
            )
        # Imported here: hookline.openhands imports this module for its types.
        from hookline.openhands import OpenHandsRuntime

        return OpenHandsRuntime(
            config.OPENHANDS_URL,
            config.OPENHANDS_API_KEY,
            config.OPENHANDS_POLL_INTERVAL,
            config.OPENHANDS_POLL_MAX_INTERVAL,
        )
    raise ConfigError(
        f"HOOKLINE_RUNTIME must be command or openhands, "
        f"not {config.HOOKLINE_RUNTIME!r}."
    )
