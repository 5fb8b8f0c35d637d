"""The code's layers, as the README's "How the code is laid out" draws them: web -> service ->
stable_diffusion, nothing importing upward or skipping a layer, and the HTTP side free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import REPO_ROOT
from tests.conftest import tiny_environment

# What each layer may import of the project (its own package included), and what it must not import
# at all. stable_diffusion/client.py is the HTTP client, installed alone: it imports nothing of ours.
LAYERS = {
    "web": {"allowed": {"web", "service"}, "forbidden": {"torch", "diffusers", "transformers", "accelerate"}},
    "service": {"allowed": {"service", "stable_diffusion"}, "forbidden": {"flask", "werkzeug", "gunicorn"}},
    "stable_diffusion": {"allowed": {"stable_diffusion"}, "forbidden": {"flask", "werkzeug", "gunicorn"}},
}
PROJECT = {"web", "service", "stable_diffusion", "app", "bench", "tests", "scripts"}
# Modules of the model layer that the service layer may import when it starts (no torch among their imports);
# the rest (loading, the generator) it imports only inside the function that builds the local backend.
TORCH_FREE = {
    "stable_diffusion", "stable_diffusion.errors", "stable_diffusion.recipe", "stable_diffusion.config",
    "stable_diffusion.image_processing", "stable_diffusion.gif_creator", "stable_diffusion.library_noise",
    "stable_diffusion.lora_library",
}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules a file imports; with `top_level_only`, not those imported inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _modules(package: str) -> list[Path]:
    return sorted(path for path in (REPO_ROOT / package).rglob("*.py") if path.name != "client.py")


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_layer_imports_only_itself_and_the_layer_below(package):
    rules = LAYERS[package]
    for path in _modules(package):
        for module in _imports(path, top_level_only=False):
            root = module.split(".")[0]
            where = f"{path.relative_to(REPO_ROOT)} imports {module}"
            assert root not in rules["forbidden"], where
            assert root not in PROJECT or root in rules["allowed"], where


def test_the_gpu_worker_command_of_the_model_layer_only_hands_over_to_the_service_layer():
    """`python -m stable_diffusion.gpu_worker` is a launcher: it runs service.gpu_worker by name and imports
    nothing, so the model layer still depends on nothing above it."""
    launcher = REPO_ROOT / "stable_diffusion" / "gpu_worker.py"
    assert _imports(launcher, top_level_only=False) == {"runpy"}
    assert 'runpy.run_module("service.gpu_worker", run_name="__main__"' in launcher.read_text()


def test_the_service_layer_imports_torch_only_when_it_builds_the_local_backend():
    for path in _modules("service"):
        for module in _imports(path, top_level_only=True):
            if module.startswith("stable_diffusion"):
                assert module in TORCH_FREE, f"{path.relative_to(REPO_ROOT)} imports {module} when it is imported"


def test_the_client_imports_nothing_of_the_server():
    imported = _imports(REPO_ROOT / "stable_diffusion" / "client.py", top_level_only=False)
    assert not {module.split(".")[0] for module in imported} & PROJECT


def test_the_http_side_imports_no_torch_until_the_local_backend_is_built(tmp_path):
    """Importing web and app, and building an app around a service that is not the local one, leave torch
    and diffusers unimported; building the local backend loads them (on its worker thread)."""
    environment = tiny_environment(tmp_path)
    script = f"""
import sys
from concurrent.futures import Future

import app
import web.images, web.jobs, web.operations, web.pages
from service.interface import GenerationService, ServiceState
from service.settings import Settings

heavy = ("torch", "diffusers", "transformers")
assert not any(name in sys.modules for name in heavy), "importing app and web"

class Remote(GenerationService):
    state = ServiceState.LOADING
    queue_depth, queue_size = 0, 1
    def admit(self, owner): pass
    def counted(self, owner): raise NotImplementedError
    def submit(self, fields, upload, owner, request_id): raise NotImplementedError
    def submit_job(self, fields, upload, owner, recorder): raise NotImplementedError
    def edge_map(self, fields, upload): raise NotImplementedError
    def position(self, request_id): return None
    def cancel(self, request_id): pass
    def describe(self): return {{}}
    def observe(self, observer): pass
    def close(self, timeout=None): pass

settings = Settings.load(env_file=None, environ={environment!r})
client = app.create_app(settings, Remote()).test_client()
assert client.get("/health").status_code == 200
assert client.get("/openapi.json").status_code == 200
assert not any(name in sys.modules for name in heavy), "building an app around another backend"

from service.local import LocalGenerationService
service = LocalGenerationService.start(settings)
assert service._worker.wait_until_loaded(120), service._worker.load_error
service.close()
assert "torch" in sys.modules and "diffusers" in sys.modules, "the local backend never loaded the model"
print("ok")
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-3000:]
