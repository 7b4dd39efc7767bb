"""Jinja templates for what the agent is told and what is posted on GitHub.

An operator overrides any template by putting a file of the same name in the
folder named by HOOKLINE_TEMPLATES_DIR.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
)


@cache
def environment(override_dir: str = "") -> Environment:
    """Return the template environment, the operator's folder searched first."""
    loaders = [FileSystemLoader(override_dir)] if override_dir else []
    loaders.append(PackageLoader("tasks", "templates"))
    # Plain text for an agent and Markdown for GitHub, so no HTML escaping.
    return Environment(  # noqa: S701
        loader=ChoiceLoader(loaders),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, override_dir: str = "", **context: Any) -> str:
    """Render template `name` with `context`."""
    return environment(override_dir).get_template(name).render(**context).strip()
