"""Instructions and comments come from templates an operator can override."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.conversations import Context, render_instructions
from tasks.triggers import classify
from tests.conftest import FIXTURES

REVIEW = json.loads((FIXTURES / "pull_request_review_comment.created.json").read_text())


def review_trigger():
    decision = classify(
        "pull_request_review_comment", REVIEW, "openhands", "@openhands"
    )
    assert decision.trigger is not None
    return decision.trigger


CONTEXT = Context(
    issue={"title": "Speed up the parser", "body": "It is slow."},
    comments=[{"user": {"login": "reviewer"}, "body": "Looks good otherwise."}],
    branch="changes",
)


def test_review_comment_instructions_carry_file_line_thread_and_request() -> None:
    text = render_instructions(review_trigger(), CONTEXT, override_dir="")

    assert "Pull request #2: Speed up the parser" in text
    assert "Branch: changes" in text
    assert "The comment is on README.md, line 265" in text
    assert "- reviewer: Looks good otherwise." in text
    assert "The request:\n@openhands extract this into a helper and add a test" in text


def test_operator_template_overrides_the_packaged_one(tmp_path: Path) -> None:
    (tmp_path / "review_comment.j2").write_text(
        "House rules first. {{ trigger.path }}:{{ trigger.line }} on {{ branch }}"
    )

    text = render_instructions(review_trigger(), CONTEXT, override_dir=str(tmp_path))

    assert text == "House rules first. README.md:265 on changes"


def test_templates_the_operator_did_not_override_still_come_from_the_package(
    tmp_path: Path,
) -> None:
    (tmp_path / "issue.j2").write_text("overridden")

    text = render_instructions(review_trigger(), CONTEXT, override_dir=str(tmp_path))

    assert "The comment is on README.md" in text
