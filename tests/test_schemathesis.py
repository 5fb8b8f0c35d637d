"""Schemathesis against a live tiny-model server, through its pytest API: no 5xx, no response outside the
document, every check on but two that cannot apply here (see EXCLUDED).

`@schema.parametrize()` makes one test per operation when the module is collected, before any server runs,
so the document is built here from the server's settings, and a test checks that the server serves exactly
that document. (The lazy `schemathesis.pytest.from_fixture` would load it from the server, but schemathesis
4.32.5's implementation of it reads `Function._nodeid`, which pytest 9.2 no longer has.)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis.configuration import set_hypothesis_home_dir

from service.fields import edge_fields_model, generate_fields_model
from service.settings import Settings
from tests.conftest import API_KEY, LiveServer, tiny_environment
from tests.figures import record
from web.openapi import build_document

EXCLUDED = {
    # "A request the schema allows must be accepted": the schema can say an image is binary, not that
    # its bytes decode as a PNG, and cannot state low_threshold < high_threshold or
    # control_start < control_end; such requests rightly get 415 or 400.
    "positive_data_acceptance": "the schema cannot express decodable image bytes or ordered pairs",
    # "A deleted resource must be gone": DELETE /jobs/<id> cancels, and the job stays readable with
    # status canceled, as the jobs API specifies.
    "use_after_free": "DELETE cancels a job; the canceled job stays readable",
}
# Small limits keep every generated request quick on a CPU; the document follows the settings.
SERVER_SETTINGS = {
    "RATE_LIMIT_PER_MINUTE": "0",
    "QUEUE_SIZE": "1000",
    "MAX_QUEUED_PER_KEY": "1000",
    "MAX_RESOLUTION": "256",
    "MAX_STEPS": "8",
}
TIMEOUT_S = 120
# Hypothesis keeps caches (the constants schemathesis collects from the code as it collects the tests, Unicode
# tables) in its home folder, .hypothesis/ in the working folder unless told otherwise: not in the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "sd-api-tests-hypothesis")
# No Hypothesis database: a deterministic run has nothing to replay.
CONFIG = {
    "seed": 1,
    "headers": {"x-api-key": API_KEY},
    "request-timeout": TIMEOUT_S,
    "generation": {"max-examples": 30, "deterministic": True, "database": "none"},
    "checks": {"max_response_time": TIMEOUT_S} | {name: {"enabled": False} for name in EXCLUDED},
}


def served_document() -> dict:
    """The document a server with SERVER_SETTINGS serves (its folders do not matter to it)."""
    settings = Settings.load(env_file=None, environ=tiny_environment(Path("unused"), **SERVER_SETTINGS))
    return build_document(settings, generate_fields_model(settings), edge_fields_model(settings))


DOCUMENT = served_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict(CONFIG))


@schema.hook
def filter_body(ctx, body) -> bool:
    """In a multipart form, a field given as an empty list is not sent at all, and a one-item list is
    sent as that item: the server cannot tell either from a valid form, so such "invalid" cases prove
    nothing. Lists of two or more are sent as repeated fields, which the server refuses, and stay."""
    if not isinstance(body, dict):
        return True
    return not any(isinstance(value, list) and len(value) < 2 for value in body.values())


@dataclass
class Tally:
    cases: int = 0
    failed: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Jobs the run leaves queued are not waited for at the end (they would hold the suite for seconds).
    server = LiveServer(tmp_path_factory.mktemp("schemathesis"), SHUTDOWN_GRACE_S="1", **SERVER_SETTINGS)
    server.wait_until_healthy()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


def test_the_server_serves_the_document_under_test(server: LiveServer):
    served = requests.get(f"{server.url}/openapi.json", verify=str(server.cert), timeout=10)
    assert served.json() == DOCUMENT


@schema.parametrize()
def test_every_answer_is_one_the_document_allows(case, server: LiveServer, tally: Tally):
    tally.cases += 1
    try:
        case.call_and_validate(base_url=server.url, verify=str(server.cert))
    except Exception:
        tally.failed.add(case.operation.label)
        raise


def test_the_run_was_large_and_the_key_never_reached_the_log(server: LiveServer, tally: Tally):
    """On the figures of the tests above, which pytest runs first (a module's tests run in order)."""
    record(schemathesis_cases=tally.cases, schemathesis_failures=len(tally.failed))
    assert tally.cases >= 300, f"only {tally.cases} cases ran: run the whole module, not this test alone"
    assert API_KEY not in server.output()
