"""Ask GitHub to deliver again what it failed to deliver to us.

GitHub does not retry a failed delivery by itself. Every few minutes beat runs
this task: it lists the App's recent deliveries, keeps those that never got a 2xx
and that Hookline has no record of, and asks GitHub to send each again, a bounded
number per run and only within GitHub's three-day window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from hookline.db import session_scope
from hookline.github import GitHubApp, GitHubError
from hookline.models import Delivery
from tasks import common
from workers.celery_app import REDELIVER_TASK, app

log = logging.getLogger(__name__)

# GitHub keeps deliveries for redelivery for three days; stay inside that.
WINDOW = timedelta(days=3) - timedelta(hours=1)
PAGES_PER_RUN = 5


def failed_guids(deliveries: Iterable[dict], now: datetime) -> dict[str, int]:
    """Return GUID → delivery id for deliveries no attempt of which succeeded."""
    failed: dict[str, int] = {}
    succeeded: set[str] = set()
    for delivery in deliveries:
        delivered_at = datetime.fromisoformat(
            delivery["delivered_at"].replace("Z", "+00:00")
        )
        if now - delivered_at > WINDOW:
            break
        guid = delivery["guid"]
        if 200 <= (delivery.get("status_code") or 0) < 300:
            succeeded.add(guid)
        else:
            failed.setdefault(guid, delivery["id"])
    return {guid: id_ for guid, id_ in failed.items() if guid not in succeeded}


def known_to_us(database_url: str, guids: set[str]) -> set[str]:
    """Return the GUIDs among `guids` that Hookline has recorded."""
    if not guids:
        return set()
    with session_scope(database_url) as session:
        rows = session.scalars(
            select(Delivery.delivery_id).where(Delivery.delivery_id.in_(guids))
        )
        return set(rows)


def redeliver_missing(
    github: GitHubApp,
    known: Callable[[set[str]], set[str]],
    limit: int,
    now: datetime | None = None,
) -> list[str]:
    """Ask GitHub to redeliver failed deliveries we never saw; return their GUIDs."""
    failed = failed_guids(
        github.hook_deliveries(PAGES_PER_RUN), now or datetime.now(UTC)
    )
    missing = [guid for guid in failed if guid not in known(set(failed))]
    asked = []
    for guid in missing[:limit]:
        github.call("POST", f"/app/hook/deliveries/{failed[guid]}/attempts")
        log.info("redelivery.requested", extra={"guid": guid})
        asked.append(guid)
    if len(missing) > limit:
        log.warning("redelivery.deferred", extra={"count": len(missing) - limit})
    return asked


@app.task(name=REDELIVER_TASK, **common.OUTAGE_RETRY)
def redeliver_failed_deliveries() -> int:
    """Ask GitHub to redeliver the deliveries that failed to reach Hookline."""
    config = common.settings()
    try:
        asked = redeliver_missing(
            common.github_app(),
            lambda guids: known_to_us(config.DATABASE_URL, guids),
            config.HOOKLINE_REDELIVERY_MAX_PER_RUN,
        )
    except GitHubError as exc:
        # The next run, a few minutes later, tries again.
        log.error("redelivery.failed", extra={"status": exc.status, "error": str(exc)})
        return 0
    return len(asked)
