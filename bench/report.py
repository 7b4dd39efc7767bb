"""Turn a run's results into ratios against the issue's targets, JSON and Markdown."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

START = "<!-- bench:results:start (written by python -m bench) -->"
END = "<!-- bench:results:end -->"


def ratios(results: dict) -> list[dict[str, object]]:
    """Return each target: what it asks, what this run measured, and if it holds."""
    web = results["gateway_vs_bare"]
    rounds = web["rounds"]

    def median(metric: str, gateway_over_bare: bool = True) -> float:
        values = [
            round_["gateway"][metric] / round_["bare"][metric]
            if gateway_over_bare
            else round_["gateway"][metric]
            for round_ in rounds
            if round_["bare"][metric]
        ]
        return round(statistics.median(values), 2) if values else float("nan")

    throughput = median("accepted_per_second")
    p99 = median("p99_ms")
    p50 = median("p50_ms")
    pipeline, noop = results["pipeline"], results["noop_chains"]
    pipeline_ratio = (
        round(pipeline["seconds"] / noop["seconds"], 2) if noop["seconds"] else 0.0
    )
    large = web["large_body"]
    counts = web["delivery_counts"]
    lost = counts.get("lost", 0) + pipeline["lost"] + noop["lost"]
    duplicated = (
        counts.get("duplicated", 0) + pipeline["duplicated"] + noop["duplicated"]
    )
    return [
        {
            "target": "gateway accepted/s ÷ bare Flask req/s ≥ 0.5",
            "measured": throughput,
            "met": throughput >= 0.5,
        },
        {
            "target": "gateway p99 ÷ bare p99 ≤ 3",
            "measured": p99,
            "met": p99 <= 3,
        },
        {
            "target": "(gateway p50 ÷ bare p50, for reference)",
            "measured": p50,
            "met": None,
        },
        {
            "target": "pipeline ÷ no-op chains, wall time ≤ 1.5",
            "measured": pipeline_ratio,
            "met": pipeline_ratio <= 1.5,
        },
        {
            "target": "large delivery accepted (202)",
            "measured": large["status"],
            "met": large["status"] == 202 and large["queued"] == 1,
        },
        {
            "target": "gateway memory growth ÷ body size ≤ 2",
            "measured": large["growth_ratio"],
            "met": large["growth_ratio"] <= 2,
        },
        {
            "target": "deliveries lost + duplicated, all runs = 0",
            "measured": lost + duplicated,
            "met": lost + duplicated == 0,
        },
    ]


def _mark(met: object) -> str:
    return {True: "met", False: "**missed**", None: "—"}[met]  # type: ignore[index]


def markdown(results: dict, targets: list[dict[str, object]]) -> str:
    """Return the generated part of RESULTS.md."""
    web = results["gateway_vs_bare"]
    options = results["options"]
    pipeline, noop = results["pipeline"], results["noop_chains"]
    large = web["large_body"]
    lines = [
        f"Run of {results['date']} on {results['cores']} cores, Python "
        f"{results['python']}, database {results['database']}, broker "
        f"{results['broker']}; "
        f"{options['delivery_bytes']} byte deliveries at concurrency "
        f"{options['concurrency']}, {options['rounds']} rounds of "
        f"{options['seconds']:g} s; {options['deliveries']} pipeline jobs; "
        f"whole run {results['wall_seconds']} s.",
        "",
        "| target | this run | |",
        "| --- | --- | --- |",
        *(
            f"| {target['target']} | {target['measured']} | {_mark(target['met'])} |"
            for target in targets
        ),
        "",
        "| round | bare req/s | gateway accepted/s | bare p50 / p99 ms "
        "| gateway p50 / p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for number, round_ in enumerate(web["rounds"], 1):
        bare, gateway = round_["bare"], round_["gateway"]
        lines.append(
            f"| {number} | {bare['accepted_per_second']} "
            f"| {gateway['accepted_per_second']} "
            f"| {bare['p50_ms']} / {bare['p99_ms']} "
            f"| {gateway['p50_ms']} / {gateway['p99_ms']} |"
        )
    counts = web["delivery_counts"]
    lines += [
        "",
        *(
            f"CPU milliseconds per {target} request, measured rounds: "
            + ", ".join(f"{name} {value}" for name, value in spent.items())
            + "."
            for target, spent in web.get("cpu_ms_per_request", {}).items()
        ),
        "",
        f"Pipeline: {pipeline['deliveries']} jobs, first request to last comment "
        f"{pipeline['seconds']} s (sending took {pipeline['sending_seconds']} s); "
        f"{noop['chains']} no-op chains of four hops {noop['seconds']} s.",
        "",
        "Counted: gateway rounds {accepted} accepted, {arrived} queued, {lost} lost, "
        "{duplicated} duplicated; pipeline {comments} comments, {plost} lost, "
        "{pdup} duplicated; no-op chains {nlost} lost, {ndup} duplicated.".format(
            accepted=counts.get("accepted", 0),
            arrived=counts.get("arrived", 0),
            lost=counts.get("lost", 0),
            duplicated=counts.get("duplicated", 0),
            comments=pipeline["comments"],
            plost=pipeline["lost"],
            pdup=pipeline["duplicated"],
            nlost=noop["lost"],
            ndup=noop["duplicated"],
        ),
        "",
        "CPU seconds during the pipeline run: "
        + ", ".join(
            f"{name} {value}" for name, value in pipeline["cpu_seconds"].items()
        )
        + ".",
        "",
        "CPU seconds during the no-op chains: "
        + ", ".join(f"{name} {value}" for name, value in noop["cpu_seconds"].items())
        + ".",
        "",
        f"Large delivery: {large['bytes']} bytes answered {large['status']} in "
        f"{large['seconds']} s; the gateway worker's peak grew {large['growth_mb']} "
        f"MiB ({large['growth_ratio']} times the body).",
        "",
        "Resident memory (MiB), at rest → after the run:",
        "",
        "| process | at rest | after |",
        "| --- | --- | --- |",
    ]
    after_run = pipeline["rss_mb"]["after_run"]
    memory = [("gateway", web["rss_mb"]["at_rest"]["gateway"], after_run["gateway"])]
    for pool, rest in pipeline["rss_mb"]["at_rest"].items():
        memory.append((pool, rest, after_run[pool]))
    for name, rest, after in memory:
        for role in rest:
            lines.append(f"| {name} {role} | {rest[role]} | {after.get(role, '—')} |")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> tuple[str, list[str]]:
    """Write results.json and the generated block of RESULTS.md under `out`.

    Return the table printed to the terminal and the targets missed.
    """
    targets = ratios(results)
    results = {**results, "targets": targets}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    block = markdown(results, targets)
    path = out / "RESULTS.md"
    existing = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if START in existing and END in existing:
        before, _, rest = existing.partition(START)
        _, _, after = rest.partition(END)
    else:
        before, after = existing.rstrip() + "\n\n", "\n"
    path.write_text(f"{before}{START}\n{block}\n{END}{after}")

    width = max(len(str(target["target"])) for target in targets)
    table = "\n".join(
        f"{target['target']:<{width}}  {target['measured']!s:>8}  "
        f"{_mark(target['met']).strip('*')}"
        for target in targets
    )
    missed = [str(t["target"]) for t in targets if t["met"] is False]
    return table, missed
