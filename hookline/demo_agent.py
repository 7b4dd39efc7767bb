"""A stand-in agent for demos: it reads the conversation and says what it got.

It is not an AI and changes nothing; set HOOKLINE_AGENT_COMMAND to a real agent.
To show the whole lifecycle it follows two rules on the latest message: one
that says "ask me first" gets a question back (exit 3, the runner's sign for
"awaiting input"), and one that says "fail on purpose" fails (exit 1).
"""

from __future__ import annotations

import os
import sys

from hookline.runtime import ASK_EXIT_CODE


def _request(transcript: str) -> str:
    """Return the first line of the latest request in the transcript."""
    if "\n--- user" in transcript:
        latest = transcript.rsplit("\n--- user", 1)[1].split("\n", 1)[-1]
    else:
        lines = transcript.splitlines()
        marker = "The request:"
        latest = "\n".join(lines[lines.index(marker) + 1 :]) if marker in lines else ""
    return next((line for line in latest.splitlines() if line.strip()), "")


def main() -> None:
    """Answer the latest message: a result, a question, or a failure."""
    transcript = sys.stdin.read()
    turn = os.environ.get("HOOKLINE_TURN", "1")
    if os.environ.get("HOOKLINE_PURPOSE") == "summary":
        follow_ups = int(turn) - 1
        said = f"{follow_ups} follow-up" + ("" if follow_ups == 1 else "s")
        print(
            f"So far: I read the request and {said if follow_ups else 'no follow-ups'}."
        )
        return
    request = _request(transcript)
    if "fail on purpose" in request.lower():
        print("demo agent: failing as asked", file=sys.stderr)
        sys.exit(1)
    if "ask me first" in request.lower():
        print("Should I keep the current behaviour behind a flag, or replace it?")
        sys.exit(ASK_EXIT_CODE)
    where = (
        f"{os.environ.get('HOOKLINE_REPOSITORY')}#{os.environ.get('HOOKLINE_NUMBER')}"
    )
    print(
        "**Hookline demo agent** (a demo, not an AI: nothing was changed).\n\n"
        f"Turn {turn}: I received {len(transcript)} characters for {where}"
        f" ({os.environ.get('HOOKLINE_TRIGGER_KIND')}).\n\n"
        f"> {request}"
    )


if __name__ == "__main__":
    main()
