"""The agent command the tests run: a real subprocess that answers by rule.

A request containing "fail please" exits 3; "sleep N" sleeps N seconds first;
anything else is echoed back with the context the runner passed in.
"""

import os
import re
import sys
import time

instructions = sys.stdin.read()
if "fail please" in instructions:
    print("Traceback (most recent call last): secret-ish detail", file=sys.stderr)
    sys.exit(3)
pause = re.search(r"sleep (\d+(?:\.\d+)?)", instructions)
if pause:
    time.sleep(float(pause.group(1)))
print(
    f"test agent finished {os.environ['HOOKLINE_REPOSITORY']}"
    f"#{os.environ['HOOKLINE_NUMBER']} ({os.environ['HOOKLINE_TRIGGER_KIND']})"
    f" branch={os.environ['HOOKLINE_BRANCH'] or '-'}"
    f" file={os.environ['HOOKLINE_FILE_PATH'] or '-'}"
    f" line={os.environ['HOOKLINE_LINE'] or '-'}"
    f" stdin={len(instructions)}"
    f" secret_visible={'GITHUB_APP_PRIVATE_KEY_PATH' in os.environ}"
)
