"""Pin the command runtime on real subprocesses: input, output, env, limits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings
from hookline.runtime import (
    ASK_EXIT_CODE,
    DEMO_AGENT,
    MAX_RESULT_CHARS,
    STOPPED_ERROR,
    AgentOutcome,
    AgentRequest,
    AgentStatus,
    CommandRuntime,
    Message,
    Purpose,
    runtime_for,
    transcript,
)

WITHHELD = (
    "GITHUB_APP_WEBHOOK_SECRET",
    "GITHUB_APP_PRIVATE_KEY",
    "GITHUB_APP_PRIVATE_KEY_PATH",
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
)


def agent(tmp_path: Path, source: str, *args: str) -> CommandRuntime:
    """Write a Python agent script and return a runtime that runs it."""
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(source))
    return CommandRuntime([sys.executable, str(script), *args])


def run(
    runtime: CommandRuntime,
    instructions: str = "do the thing",
    context: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> AgentOutcome:
    request = AgentRequest(
        "c-1", (Message("user", instructions),), context or {}, timeout
    )
    return runtime.run(request, lambda: True, 0.5)


def is_running(pid: int) -> bool:
    """Tell whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def test_exit_zero_finishes_with_stripped_stdout(tmp_path: Path) -> None:
    runtime = agent(tmp_path, "print('\\n  the result\\n\\nsecond line  \\n')")

    outcome = run(runtime)

    assert outcome.status is AgentStatus.FINISHED
    assert outcome.output == "the result\n\nsecond line"
    assert outcome.error == ""


def test_silent_agent_finishes_with_a_placeholder(tmp_path: Path) -> None:
    outcome = run(agent(tmp_path, "pass"))

    assert outcome.status is AgentStatus.FINISHED
    assert outcome.output == "(the agent finished without output)"


def test_instructions_arrive_on_stdin_byte_for_byte(tmp_path: Path) -> None:
    received = tmp_path / "stdin.bin"
    runtime = agent(
        tmp_path,
        """
        import pathlib, sys
        pathlib.Path(sys.argv[1]).write_bytes(sys.stdin.buffer.read())
        """,
        str(received),
    )
    instructions = "  Fix «the» parser 🚀\n修复最后一行\n\n\tcode\n"

    outcome = run(runtime, instructions)

    assert outcome.status is AgentStatus.FINISHED
    assert received.read_bytes() == instructions.encode("utf-8")


def test_instructions_larger_than_a_pipe_buffer_arrive_whole(tmp_path: Path) -> None:
    runtime = agent(
        tmp_path, "import sys\nprint(len(sys.stdin.buffer.read().decode()))"
    )

    outcome = run(runtime, "é" * 300_000)

    assert outcome.output == "300000"


def test_context_arrives_in_the_environment(tmp_path: Path) -> None:
    runtime = agent(
        tmp_path,
        """
        import os
        print(os.environ["HOOKLINE_REPOSITORY"], os.environ["HOOKLINE_NUMBER"])
        """,
    )

    outcome = run(
        runtime,
        context={
            "HOOKLINE_REPOSITORY": "octo-user/Hello-World",
            "HOOKLINE_NUMBER": "7",
        },
    )

    assert outcome.output == "octo-user/Hello-World 7"


def test_secrets_in_the_parent_environment_are_withheld(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in WITHHELD:
        monkeypatch.setenv(name, f"secret-{name}")
    monkeypatch.setenv("HOOKLINE_TEST_PASSED_THROUGH", "visible")
    runtime = agent(
        tmp_path,
        f"""
        import json, os
        names = {[*WITHHELD, "HOOKLINE_TEST_PASSED_THROUGH"]!r}
        print(json.dumps(sorted(name for name in names if name in os.environ)))
        """,
    )

    outcome = run(runtime)

    assert json.loads(outcome.output) == ["HOOKLINE_TEST_PASSED_THROUGH"]


def test_non_zero_exit_is_an_error_without_stderr(tmp_path: Path) -> None:
    runtime = agent(
        tmp_path,
        """
        import sys
        print("partial output")
        print("Traceback: token ghs_leaked", file=sys.stderr)
        sys.exit(2)
        """,
    )

    outcome = run(runtime)

    assert outcome.status is AgentStatus.ERROR
    assert "code 2" in outcome.error
    assert "ghs_leaked" not in outcome.error
    assert "Traceback" not in outcome.error
    assert outcome.output == ""


def test_timeout_is_an_error_and_kills_the_agents_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    runtime = agent(
        tmp_path,
        """
        import pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        pathlib.Path(sys.argv[1]).write_text(str(child.pid))
        time.sleep(30)
        """,
        str(pid_file),
    )

    started = time.monotonic()
    outcome = run(runtime, timeout=1.0)
    elapsed = time.monotonic() - started

    child = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 3
        while is_running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_running(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert outcome.status is AgentStatus.ERROR
    assert "timed out" in outcome.error
    assert "1 s" in outcome.error
    assert elapsed < 5


def test_heartbeat_is_called_while_the_agent_works(tmp_path: Path) -> None:
    runtime = agent(tmp_path, "import time\ntime.sleep(1)\nprint('done')")
    beats: list[float] = []

    def heartbeat() -> bool:
        beats.append(time.monotonic())
        return True

    outcome = runtime.run(
        AgentRequest("c-1", (Message("user", "work"),), {}, 10.0), heartbeat, 0.2
    )

    assert outcome.output == "done"
    assert len(beats) >= 3


def test_missing_executable_did_not_start(tmp_path: Path) -> None:
    runtime = CommandRuntime([str(tmp_path / "no-such-agent")])

    outcome = run(runtime)

    assert outcome.status is AgentStatus.ERROR
    assert "did not start" in outcome.error


def test_output_over_the_limit_is_truncated_with_a_note(tmp_path: Path) -> None:
    runtime = agent(tmp_path, f"print('x' * {MAX_RESULT_CHARS + 500})")

    outcome = run(runtime)

    kept, note = outcome.output[:MAX_RESULT_CHARS], outcome.output[MAX_RESULT_CHARS:]
    assert kept == "x" * MAX_RESULT_CHARS
    assert "truncated" in note
    assert "x" not in note


def test_output_at_the_limit_is_kept_whole(tmp_path: Path) -> None:
    runtime = agent(tmp_path, f"print('x' * {MAX_RESULT_CHARS})")

    assert run(runtime).output == "x" * MAX_RESULT_CHARS


def test_agent_command_is_split_like_a_shell() -> None:
    runtime = runtime_for(
        load_settings({}, {"HOOKLINE_AGENT_COMMAND": "my-agent --model 'big one'"})
    )

    assert isinstance(runtime, CommandRuntime)
    assert runtime.command == ["my-agent", "--model", "big one"]


def test_empty_agent_command_runs_the_demo_agent() -> None:
    runtime = runtime_for(load_settings({}))

    outcome = run(
        runtime,
        "Context...\nThe request:\n\n@openhands fix the parser\n",
        context={
            "HOOKLINE_REPOSITORY": "octo-user/Hello-World",
            "HOOKLINE_NUMBER": "1",
            "HOOKLINE_TRIGGER_KIND": "issue",
        },
    )

    assert isinstance(runtime, CommandRuntime)
    assert runtime.command == DEMO_AGENT
    assert outcome.status is AgentStatus.FINISHED
    assert "a demo, not an AI" in outcome.output
    assert "octo-user/Hello-World#1" in outcome.output
    assert "@openhands fix the parser" in outcome.output


def test_an_unknown_runtime_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="HOOKLINE_RUNTIME"):
        runtime_for(load_settings({"HOOKLINE_RUNTIME": "magic"}))


def test_exit_code_3_is_a_question(tmp_path: Path) -> None:
    runtime = agent(
        tmp_path, f"import sys\nprint('which branch?')\nsys.exit({ASK_EXIT_CODE})"
    )

    outcome = run(runtime)

    assert outcome.status is AgentStatus.AWAITING_INPUT
    assert outcome.output == "which branch?"


def test_a_heartbeat_saying_stop_kills_the_agent_at_once(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    runtime = agent(
        tmp_path,
        f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(30)
        """,
    )
    started = time.monotonic()

    outcome = runtime.run(
        AgentRequest("c-1", (Message("user", "work"),), {}, 60.0), lambda: False, 0.2
    )

    assert outcome.status is AgentStatus.ERROR
    assert outcome.error == STOPPED_ERROR
    assert time.monotonic() - started < 5
    assert not is_running(int(pid_file.read_text()))


def test_later_turns_read_the_whole_transcript_with_speakers_marked(
    tmp_path: Path,
) -> None:
    runtime = agent(
        tmp_path,
        """
        import os, sys
        print(repr(sys.stdin.read()), os.environ["HOOKLINE_TURN"],
              os.environ["HOOKLINE_PURPOSE"])
        """,
    )
    messages = (
        Message("user", "Instructions", "alice"),
        Message("agent", "Which file?"),
        Message("user", "@openhands parser.py", "bob"),
        Message("hookline", "Summarize your progress"),
    )

    outcome = runtime.run(
        AgentRequest("c-1", messages, {}, 10.0, purpose=Purpose.SUMMARY),
        lambda: True,
        0.5,
    )

    expected = transcript(messages)
    assert expected == (
        "Instructions\n\n--- agent ---\nWhich file?\n\n"
        "--- user bob ---\n@openhands parser.py\n\n"
        "--- hookline ---\nSummarize your progress"
    )
    assert outcome.output == f"{expected!r} 2 summary"
