"""Hostile files and fuzzed fields against a real server: always a picture or a 4xx JSON error, in
bounded time, nothing kept for refused requests, and the server healthy afterwards."""

from __future__ import annotations

import io
import re
import time
from collections import OrderedDict

import pytest
import requests
from allpairspy import AllPairs
from PIL import Image

from tests.conftest import API_KEY, LiveServer
from tests.figures import record
from tests.hostile_files import hostile_files
from tests.images import animated_gif_bytes, drawing, encode, png_bytes

KEY = {"x-api-key": API_KEY}
IMAGE_ENDPOINTS = ("/generate", "/preprocess", "/jobs")
SERVER_NAMED = re.compile(r"\d{8}_\d{6}_[0-9a-f]{6}\.(png|jpg|gif)")
# A refused request answers within this; an accepted one (a 64 px picture) well within it.
BOUND_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("hostile"), RATE_LIMIT_PER_MINUTE="0")
    server.wait_until_healthy()
    yield server
    server.stop()


def kept_files(server) -> set[str]:
    return {
        f"{folder}/{path.name}"
        for folder in ("input_images", "output_images")
        if (server.folder / folder).exists()
        for path in (server.folder / folder).iterdir()
    }


def post(server, path: str, files, data=None, headers=KEY) -> requests.Response:
    started = time.monotonic()
    response = requests.post(
        f"{server.url}{path}", headers=headers, files=files, data=data if data is not None else {"prompt": "a fox"},
        verify=str(server.cert), timeout=BOUND_S,
    )
    assert time.monotonic() - started < BOUND_S
    return response


def assert_picture_or_client_error(response: requests.Response, context) -> None:
    if response.status_code in (200, 202):
        if response.status_code == 200:
            assert response.headers["Content-Type"] in ("image/png", "image/gif"), context
        return
    assert 400 <= response.status_code < 500, (context, response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == "application/json", context
    message = response.json()["error"]
    assert "Traceback" not in message and "/work" not in message and ".py" not in message, context


def assert_job_delivers_a_picture(server, job_id: str, context) -> None:
    """An accepted job ends succeeded, within the bound, and its result is a PNG or GIF."""
    deadline = time.monotonic() + BOUND_S
    while (job := requests.get(f"{server.url}/jobs/{job_id}", headers=KEY, verify=str(server.cert), timeout=10).json())[
        "status"
    ] in ("queued", "running"):
        assert time.monotonic() < deadline, context
        time.sleep(0.1)
    assert job["status"] == "succeeded", (context, job)
    result = requests.get(f"{server.url}/jobs/{job_id}/result", headers=KEY, verify=str(server.cert), timeout=10)
    assert result.status_code == 200, (context, result.text[:300])
    assert result.headers["Content-Type"] in ("image/png", "image/gif"), context
    assert result.content.startswith((b"\x89PNG\r\n\x1a\n", b"GIF89a")), context


def test_every_hostile_file_gets_a_picture_or_a_4xx_on_every_image_endpoint(server):
    corpus = hostile_files()
    assert len(corpus) >= 40
    server_errors = jobs_succeeded = 0
    for name, data in corpus:
        for path in IMAGE_ENDPOINTS:
            before = kept_files(server)
            response = post(server, path, {"image": (name, data)})
            server_errors += response.status_code >= 500
            assert_picture_or_client_error(response, (name, path))
            if response.status_code >= 400:
                assert kept_files(server) == before, (name, path, "a refused upload left files")
            if response.status_code == 202:
                assert_job_delivers_a_picture(server, response.json()["id"], (name, path))
                jobs_succeeded += 1
    record(
        hostile_files=len(corpus), hostile_requests=len(corpus) * len(IMAGE_ENDPOINTS), hostile_5xx=server_errors,
        hostile_jobs_succeeded=jobs_succeeded,
    )
    assert requests.get(f"{server.url}/ready", headers=KEY, verify=str(server.cert), timeout=10).status_code == 200
    assert post(server, "/generate", {"image": ("ok.png", png_bytes())}).status_code == 200


FUZZ_VALUES = [
    "",
    " ",
    "x" * 100_000,
    "\x00",
    "1\x00",
    "NaN",
    "nan",
    "inf",
    "-Infinity",
    "1e309",
    "-0",
    " 1 ",
    "0x10",
    "1_000",
    "[]",
    "{}",
    "null",
    "true",
    str(2**70),
    "-1",
    "\u202e\u0000\ud7ff",
    "<script>alert(1)</script>",
]
FUZZ_BYTES = [b"\xff\xfe\xfd", b"caf\xe9", b"\xc0\xaf"]


def fuzz_fields(server) -> list[str]:
    document = requests.get(f"{server.url}/openapi.json", headers=KEY, verify=str(server.cert), timeout=10).json()
    return [name for name in document["components"]["schemas"]["GenerateForm"]["properties"] if name != "image"]


def test_every_field_fuzzed_gets_a_picture_or_a_4xx(server):
    tried = server_errors = 0
    for field in fuzz_fields(server):
        for value in FUZZ_VALUES + FUZZ_BYTES:
            data = {"prompt": "a fox", field: value}
            response = post(server, "/generate", {"image": ("p.png", png_bytes(48, 32))}, data=data)
            tried += 1
            server_errors += response.status_code >= 500
            assert_picture_or_client_error(response, (field, value[:20]))
    record(fuzzed_fields=len(fuzz_fields(server)), fuzz_requests=tried, fuzz_5xx=server_errors)


def test_text_that_is_not_utf8_and_numbers_with_underscores_are_400(server):
    image = {"image": ("p.png", png_bytes())}
    for field in ("prompt", "negative_prompt"):
        for value in FUZZ_BYTES:
            response = post(server, "/generate", image, data={"prompt": "a fox", field: value})
            assert response.status_code == 400, (field, value, response.status_code)
            assert f"{field} is not valid UTF-8" in response.json()["error"]
    for field, value in (("steps", "1_0"), ("seed", "1_000"), ("guidance_scale", "7_5"), ("resolution", "6_4")):
        response = post(server, "/generate", image, data={"prompt": "a fox", field: value})
        assert response.status_code == 400, (field, value, response.status_code)
        assert f"{field}: '{value}' is not a number (no underscores" in response.json()["error"]
    record(encoding_and_digit_cases=2 * len(FUZZ_BYTES) + 4)


def field_combinations(schema: dict) -> list[dict]:
    """Every pair of edge values of any two fields appears together in at least one request (allpairspy's
    pairwise cover); the smallest resolution and the samplers come from the published schema."""
    smallest = schema["resolution"]["minimum"]
    uploads = {
        "still": ("p.png", png_bytes()),
        "tall": ("t.png", png_bytes(40, 96)),
        "jpeg": ("p.jpg", encode(drawing(), "JPEG")),
        "animated": ("a.gif", animated_gif_bytes([80, 200], size=(48, 32))),
    }
    values = OrderedDict(
        image=list(uploads),
        progress_gif=["true", "false"],
        steps=[1, 2, 3],
        refine_strength=[0, 0.5, 1],
        scheduler=schema["scheduler"]["enum"],
        control_window=[(0, 1), (0.5, 0.55), (0, 0.01), (0.99, 1)],
        guidance_scale=[0, 7.5, 30],
        resolution=[smallest, smallest + 8, 2 * smallest],
        sensitivity=[0, 1, 2],
        thresholds=[(100, 200), (0, 1), (254, 255)],
        seed=[0, 2**32 - 1],
        negative_prompt=["", "blurry, dark"],
    )

    def valid(row: list) -> bool:
        # A progress GIF of an animated upload is refused with a 400, by design.
        return len(row) < 2 or not (row[0] == "animated" and row[1] == "true")

    combinations = []
    for row in AllPairs(values, filter_func=valid):
        fields = row._asdict()
        image = uploads[fields.pop("image")]
        fields["control_start"], fields["control_end"] = fields.pop("control_window")
        fields["low_threshold"], fields["high_threshold"] = fields.pop("thresholds")
        combinations.append((image, {"prompt": "a fox"} | {name: str(value) for name, value in fields.items()}))
    return combinations


def test_every_pairwise_combination_of_valid_field_values_gets_its_picture(server):
    document = requests.get(f"{server.url}/openapi.json", headers=KEY, verify=str(server.cert), timeout=10).json()
    combinations = field_combinations(document["components"]["schemas"]["GenerateForm"]["properties"])
    failures = []
    for image, data in combinations:
        response = post(server, "/generate", {"image": image}, data=data)
        animated = data["progress_gif"] == "true" or image[0].endswith(".gif")
        expected = "image/gif" if animated else "image/png"
        if response.status_code != 200 or response.headers["Content-Type"] != expected:
            failures.append((data, image[0], response.status_code, response.text[:200]))
            continue
        picture = Image.open(io.BytesIO(response.content))
        assert max(picture.size) == int(data["resolution"]), (data, picture.size)
    record(field_combination_requests=len(combinations), field_combination_failures=len(failures))
    assert not failures, failures


def test_repeated_fields_fields_as_files_and_files_as_fields_are_400(server):
    image = ("p.png", png_bytes())
    cases = [
        ([("image", image), ("image", image)], {"prompt": "x"}, "image was sent 2 times"),
        ([("image", image)], [("prompt", "a"), ("prompt", "b")], "prompt was sent 2 times"),
        ([("image", image), ("prompt", ("prompt.txt", b"a fox"))], {}, "prompt was sent as a file"),
        ([("image", image), ("extra", ("x.bin", b"1"))], {"prompt": "x"}, "extra is not a field"),
        ([], {"prompt": "x", "image": "not a file"}, "image must be a file upload"),
    ]
    for files, data, words in cases:
        response = post(server, "/generate", files, data=data)
        assert response.status_code == 400 and words in response.json()["error"], response.text
    record(structure_cases=len(cases))


@pytest.mark.parametrize(
    "filename",
    ["../../escape.png", "/etc/passwd", "..\\..\\windows\\win.ini", "a\x00b.png", "x" * 5000 + ".png", "CON", ""],
)
def test_uploaded_file_names_are_never_used_for_paths(server, filename):
    before = kept_files(server)
    response = post(server, "/generate", {"image": (filename, png_bytes())})
    assert response.status_code == 200
    new = kept_files(server) - before
    assert len(new) == 2 and all(SERVER_NAMED.fullmatch(name.split("/")[1]) for name in new), new
    assert not (server.folder.parent / "escape.png").exists()


def test_too_many_parts_and_oversized_text_fields_are_413_json(server):
    many_parts = {f"field{index}": "1" for index in range(200)}
    response = post(server, "/generate", {"image": ("p.png", png_bytes())}, data=many_parts)
    assert response.status_code == 413 and "error" in response.json()
    huge_prompt = {"prompt": "x" * 400_000}
    response = post(server, "/generate", {"image": ("p.png", png_bytes())}, data=huge_prompt)
    assert response.status_code == 413 and "text fields" in response.json()["error"]
    assert requests.get(f"{server.url}/health", verify=str(server.cert), timeout=10).status_code == 200
