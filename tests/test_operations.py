"""/ready, /metrics, CORS and the OpenAPI contract, through the Flask app."""

from __future__ import annotations

import io
import threading

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from app import create_app
from service.local import LocalGenerationService
from service.settings import Settings
from service.worker import GenerationWorker
from tests.conftest import API_KEY, tiny_environment
from tests.images import png_bytes
from tests.test_generate_api import assert_error, post_generate
from tests.test_jobs import submit, wait_for

KEY = {"x-api-key": API_KEY}


def test_ready_is_503_while_the_model_loads_and_200_after(pipeline_runner, settings):
    loaded = threading.Event()
    worker = GenerationWorker(lambda: loaded.wait(30) and pipeline_runner, settings.queue_size)
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    try:
        loading = client.get("/ready", headers=KEY)
        assert loading.status_code == 503
        assert loading.get_json()["status"] == "loading" and "still loading" in loading.get_json()["error"]
        assert loading.headers["Retry-After"] == "5"
        schema(client.get("/openapi.json").get_json(), "NotReady").validate(loading.get_json())
        assert client.get("/health").status_code == 200
        # Work sent during loading waits in the queue and is served once the model is there.
        job_id = submit(client).get_json()["id"]
        loaded.set()
        assert worker.wait_until_loaded(30)
        ready = client.get("/ready", headers=KEY)
        assert ready.status_code == 200
        assert ready.get_json() == {"status": "ready", "queue_depth": 0, "queue_size": settings.queue_size} or (
            ready.get_json()["queue_depth"] <= 1
        )
        wait_for(client, job_id, "succeeded")
    finally:
        loaded.set()
        worker.close(timeout=60)
    assert client.get("/ready", headers=KEY).get_json()["status"] == "stopped"


def test_a_model_that_fails_to_load_makes_ready_503_and_generation_503(settings):
    def fail():
        raise OSError("no weights here")

    worker = GenerationWorker(fail, settings.queue_size)
    client = create_app(settings, LocalGenerationService(settings, worker)).test_client()
    assert not worker.wait_until_loaded(30)
    assert_error(client.get("/ready", headers=KEY), 503, "failed to load")
    assert_error(post_generate(client, png_bytes()), 503, "failed")


def metric(client, line_start: str) -> float:
    text = client.get("/metrics", headers=KEY).get_data(as_text=True)
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def test_metrics_count_requests_generations_images_and_jobs(client):
    response = client.get("/metrics", headers=KEY)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert metric(client, "images_generated_total") == 0
    post_generate(client, png_bytes())
    post_generate(client, png_bytes(), steps="0")
    wait_for(client, submit(client).get_json()["id"], "succeeded")
    assert metric(client, 'http_requests_total{endpoint="images.generate",status="200"}') == 1
    assert metric(client, 'http_requests_total{endpoint="images.generate",status="400"}') == 1
    assert metric(client, 'http_requests_total{endpoint="jobs.submit",status="202"}') == 1
    assert metric(client, "images_generated_total") == 2
    assert metric(client, "generation_seconds_count") == 2
    assert metric(client, 'jobs{status="succeeded"}') == 1
    assert metric(client, "queue_depth") == 0


@pytest.fixture
def cors_client(worker, tmp_path):
    environment = tiny_environment(tmp_path, CORS_ORIGINS="https://tools.example, https://forms.example")
    settings = Settings.load(env_file=None, environ=environment)
    return create_app(settings, LocalGenerationService(settings, worker)).test_client()


def test_cors_preflight_allows_listed_origins_and_the_api_key_header(cors_client):
    preflight = cors_client.options(
        "/generate",
        headers={
            "Origin": "https://tools.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://tools.example"
    assert "x-api-key" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    answer = cors_client.get("/jobs/nope", headers=KEY | {"Origin": "https://forms.example"})
    assert answer.headers["Access-Control-Allow-Origin"] == "https://forms.example"


def test_cors_refuses_unlisted_origins_and_is_off_by_default(cors_client, client):
    preflight_headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert "Access-Control-Allow-Origin" not in cors_client.options("/generate", headers=preflight_headers).headers
    listed = preflight_headers | {"Origin": "https://tools.example"}
    assert "Access-Control-Allow-Origin" not in client.options("/generate", headers=listed).headers


@pytest.fixture
def document(client) -> dict:
    response = client.get("/openapi.json")  # public: Swagger UI reads it before a key is entered
    assert response.status_code == 200
    return response.get_json()


def test_the_openapi_document_is_valid_and_covers_every_route(document, app):
    validate(document)
    routes = {
        (rule.rule.replace("<job_id>", "{job_id}"), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint.split(".")[0] in ("operations", "images", "jobs") or rule.rule == "/openapi.json"
    }
    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method != "parameters"
    }
    assert routes == documented


def schema(document: dict, name: str) -> OAS30Validator:
    """A validator of one component schema, which may refer to others in the document."""
    return OAS30Validator({"$ref": f"#/components/schemas/{name}", "components": document["components"]})


def test_real_responses_match_the_document(document, client):
    job = submit(client).get_json()
    schema(document, "Job").validate(job)
    schema(document, "Job").validate(wait_for(client, job["id"], "succeeded"))
    schema(document, "Ready").validate(client.get("/ready", headers=KEY).get_json())
    schema(document, "Info").validate(client.get("/info", headers=KEY).get_json())
    schema(document, "Health").validate(client.get("/health").get_json())
    schema(document, "Error").validate(client.get("/jobs/nope", headers=KEY).get_json())
    schema(document, "Error").validate(post_generate(client, png_bytes(), steps="0").get_json())
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method != "parameters" and operation.get("security") != []:
                assert "401" in operation["responses"] or path == "/health", (path, method)


def test_every_documented_limit_is_the_one_enforced(document, client):
    """Values just past each documented bound are refused with a 400 naming the field; the bounds
    themselves are accepted (checked on /preprocess for its fields, which costs no generation)."""
    form = document["components"]["schemas"]["GenerateForm"]
    assert set(form["required"]) == {"image", "prompt"}
    for name, field in form["properties"].items():
        past = []
        if "maximum" in field:
            past.append(field["maximum"] + (1 if field["type"] == "integer" else 0.01))
        if "minimum" in field:
            past.append(field["minimum"] - (1 if field["type"] == "integer" else 0.01))
        if "enum" in field:
            past.append("not-" + field["enum"][0])
        if field.get("maxLength"):
            past.append("x" * (field["maxLength"] + 1))
        for value in past:
            assert_error(submit(client, **{name: str(value)}), 400, name)
    edges = document["components"]["schemas"]["PreprocessForm"]["properties"]
    for name in ("resolution", "low_threshold", "high_threshold"):
        bound = edges[name]["maximum"] if name != "low_threshold" else edges[name]["minimum"]
        data = {"image": (io.BytesIO(png_bytes()), "p.png"), name: str(bound)}
        response = client.post("/preprocess", headers=KEY, data=data, content_type="multipart/form-data")
        assert response.status_code == 200, response.get_data(as_text=True)
    assert edges["resolution"]["multipleOf"] == 8


def test_the_docs_page_and_its_assets_are_served_locally(client):
    page = client.get("/docs")
    assert page.status_code == 200 and b"swagger-ui-bundle.js" in page.data
    assert b"https://" not in page.data
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/static/docs.js"):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/docs/assets/index.html").status_code == 404
