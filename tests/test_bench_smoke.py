"""The benchmark, shrunk to a few deliveries, run as the README runs it.

Benchmarks are never timed tests: no number is checked here. What is checked is
that every phase ran against the real processes and that every delivery was
counted, none lost and none doubled, so bench/ cannot rot unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ADMIN_DATABASE_URL, ROOT

TIMEOUT = 240


def run_smoke_bench(out: Path) -> str:
    """Run `python -m bench --smoke`; return its output, or fail with it."""
    env = {
        **os.environ,
        "HOOKLINE_BENCH_WORKDIR": str(out / "work"),
        "HOOKLINE_BENCH_ADMIN_DATABASE_URL": ADMIN_DATABASE_URL,
        # Not the databases a bench run by hand empties, so both can run at once.
        "HOOKLINE_BENCH_REDIS_URL": "redis://127.0.0.1:6379/10",
        "HOOKLINE_BENCH_BROKER_URL": "redis://127.0.0.1:6379/11",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the bench then stops every process it started.
        process.terminate()
        output, _ = process.communicate(timeout=60)
        raise AssertionError(
            f"the bench ran over {TIMEOUT} s:\n{output[-3000:]}"
        ) from None
    assert process.returncode == 0, output[-3000:]
    return output


def test_smoke_bench_runs_every_phase_and_loses_no_delivery(tmp_path: Path) -> None:
    output = run_smoke_bench(tmp_path)

    results = json.loads((tmp_path / "results.json").read_text())
    gateway = results["gateway_vs_bare"]
    counts = gateway["delivery_counts"]
    assert counts["accepted"] > 0
    assert counts["arrived"] == counts["accepted"]
    assert counts["lost"] == counts["duplicated"] == counts["unexpected"] == 0
    for round_ in gateway["rounds"]:
        assert round_["bare"]["statuses"] == {"200": round_["bare"]["requests"]}
        assert round_["gateway"]["statuses"] == {"202": round_["gateway"]["requests"]}
    assert gateway["large_body"]["status"] == 202
    assert gateway["large_body"]["queued"] == 1

    pipeline = results["pipeline"]
    assert pipeline["comments"] == pipeline["deliveries"] == 3
    assert pipeline["lost"] == pipeline["duplicated"] == 0
    assert pipeline["verdicts"] == {"job": 3}
    assert pipeline["callbacks"] == {"posted": 3}

    noop = results["noop_chains"]
    assert noop["finished"] == noop["chains"] == 3
    assert noop["lost"] == noop["duplicated"] == 0

    assert len(results["targets"]) == 7
    assert "deliveries lost + duplicated, all runs = 0" in output
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| gateway accepted/s ÷ bare Flask req/s ≥ 0.5 |" in report
