"""What an app is built from, one typed accessor each (as Flask's tutorial has `get_db`): a view asks for the
part it needs, and a type checker sees what it gets. `create_app` installs them; nothing else looks them up by
name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, current_app
from pydantic import BaseModel

from service.fields import LoraLibrary
from service.interface import GenerationService
from service.jobs import JobManager
from service.settings import Settings

if TYPE_CHECKING:
    from web.operations import Metrics

_KEY = "stable_diffusion_api"


@dataclass(frozen=True)
class AppParts:
    settings: Settings
    service: GenerationService
    jobs: JobManager
    loras: LoraLibrary
    # The /generate and /preprocess form fields, built from the settings (and the LoRAs there are).
    generate_fields: type[BaseModel]
    edge_fields: type[BaseModel]


def install(app: Flask, parts: AppParts) -> None:
    app.extensions[_KEY] = parts


def install_metrics(app: Flask, metrics: Metrics) -> None:
    """Metrics come last: they count the answers of an app whose other parts are in place."""
    app.extensions[f"{_KEY}.metrics"] = metrics


def parts(app: Flask | None = None) -> AppParts:
    return (app or current_app).extensions[_KEY]


def get_settings(app: Flask | None = None) -> Settings:
    return parts(app).settings


def get_service(app: Flask | None = None) -> GenerationService:
    return parts(app).service


def get_jobs(app: Flask | None = None) -> JobManager:
    return parts(app).jobs


def get_loras() -> LoraLibrary:
    return parts().loras


def get_generate_fields() -> type[BaseModel]:
    return parts().generate_fields


def get_edge_fields() -> type[BaseModel]:
    return parts().edge_fields


def get_metrics() -> Metrics:
    return current_app.extensions[f"{_KEY}.metrics"]
