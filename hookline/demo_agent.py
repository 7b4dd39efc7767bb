"""A stand-in agent for demos: it reads its instructions and says what it got.

It is not an AI and changes nothing; set HOOKLINE_AGENT_COMMAND to a real agent.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Print a reply that shows the request reached the agent intact."""
    instructions = sys.stdin.read()
    request = ""
    lines = instructions.splitlines()
    if "The request:" in lines:
        following = lines[lines.index("The request:") + 1 :]
        request = next((line for line in following if line.strip()), "")
    where = (
        f"{os.environ.get('HOOKLINE_REPOSITORY')}#{os.environ.get('HOOKLINE_NUMBER')}"
    )
    print(
        "**Hookline demo agent** (a demo, not an AI: nothing was changed).\n\n"
        f"I received {len(instructions)} characters of instructions for {where}"
        f" ({os.environ.get('HOOKLINE_TRIGGER_KIND')}).\n\n"
        f"> {request}"
    )


if __name__ == "__main__":
    main()
