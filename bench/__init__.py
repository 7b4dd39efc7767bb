"""Hookline's benchmark: the gateway and the pipeline against their ceilings.

`python -m bench` runs it on loopback and writes bench/results.json and
bench/RESULTS.md; see bench/README_SECTION.md.
"""
