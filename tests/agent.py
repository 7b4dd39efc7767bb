"""The agent command the tests run: a real subprocess that answers by rule.

It reads the transcript on stdin and looks only at the last user message:
"sleep N" sleeps N seconds first; then "fail please" exits 4; "ask please"
asks a question (exit 3); anything else is echoed back with the context it was given.
Asked for a summary (HOOKLINE_PURPOSE=summary), it sums up the turns so far.
"""

import os
import re
import sys
import time

transcript = sys.stdin.read()
last = transcript.rsplit("\n--- user", 1)[-1]
turn = os.environ.get("HOOKLINE_TURN", "?")
if os.environ.get("HOOKLINE_PURPOSE") == "summary":
    print(f"summary: {transcript.count('--- user')} follow-ups so far, turn {turn}")
    sys.exit(0)
pause = re.search(r"sleep (\d+(?:\.\d+)?)", last)
if pause:
    time.sleep(float(pause.group(1)))
if "fail please" in last:
    print("Traceback (most recent call last): secret-ish detail", file=sys.stderr)
    sys.exit(4)
if "ask please" in last:
    print(f"which option do you want? (turn {turn})")
    sys.exit(3)
print(
    f"test agent finished {os.environ['HOOKLINE_REPOSITORY']}"
    f"#{os.environ['HOOKLINE_NUMBER']} ({os.environ['HOOKLINE_TRIGGER_KIND']})"
    f" turn={turn}"
    f" branch={os.environ['HOOKLINE_BRANCH'] or '-'}"
    f" file={os.environ['HOOKLINE_FILE_PATH'] or '-'}"
    f" line={os.environ['HOOKLINE_LINE'] or '-'}"
    f" stdin={len(transcript)}"
    f" secret_visible={'GITHUB_APP_PRIVATE_KEY_PATH' in os.environ}"
)
