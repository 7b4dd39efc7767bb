"""The README's first command, run as a user would, so it cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_demo_gives_every_recorded_delivery_its_outcome(tmp_path: Path) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"}
    }
    # Not var/demo/: a demo run by hand keeps its database for `hookline explain`.
    env["HOOKLINE_DEMO_DIR"] = str(tmp_path / "demo")
    finished = subprocess.run(
        [sys.executable, "-m", "hookline.demo", "--timeout", "60"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "17/17 deliveries got the expected outcome" in finished.stdout
    # 4 recorded jobs, then a question, its answer and an error: one comment each.
    assert "fake GitHub received 7 comments and 13 reactions" in finished.stdout
    assert "turn 2: finished (now finished)" in finished.stdout
    assert "turn 1: error (now error)" in finished.stdout
    assert "**I need your input:**" in finished.stdout
    assert "HTTP 200 duplicate" in finished.stdout
    assert "HTTP 403 bad_signature" in finished.stdout
    assert "FAIL" not in finished.stdout
    assert f"DATABASE_URL=sqlite:///{tmp_path}/demo/hookline.sqlite3" in finished.stdout
