"""The job statuses have one source, `JobStatus` (service/jobs/store.py); the client, installed alone, and the
page, in JavaScript, cannot import it, so their own lists are pinned to it here."""

from __future__ import annotations

import re
from pathlib import Path

from service.jobs import FINISHED, JobStatus
from service.settings import REPO_ROOT
from stable_diffusion import client

APP_JS = REPO_ROOT / "web" / "static" / "app.js"


def _compared(source: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, source))


def test_the_finished_statuses_are_statuses():
    assert FINISHED < set(JobStatus)
    assert {JobStatus.QUEUED, JobStatus.RUNNING}.isdisjoint(FINISHED)


def test_the_client_knows_the_finished_statuses_and_compares_only_statuses():
    assert set(client.FINISHED) == FINISHED
    compared = _compared(Path(client.__file__).read_text(encoding="utf-8"), r'\["status"\] (?:==|!=) "(\w+)"')
    assert compared and compared <= set(JobStatus), compared


def test_the_page_knows_the_finished_statuses_and_compares_only_statuses():
    source = APP_JS.read_text(encoding="utf-8")
    # The list the page checks a stream's last status against: ["succeeded", ...].includes(last.status)
    (finished,) = re.findall(r"\[([^\]]*)\]\.includes\(\w+\.status\)", source)
    assert set(re.findall(r'"(\w+)"', finished)) == FINISHED
    compared = _compared(source, r'\.status (?:===|!==) "(\w+)"')
    assert compared and compared <= set(JobStatus), compared
    # Every finished status is handled once the stream ends: succeeded shows the picture, the others an error.
    assert FINISHED <= compared
