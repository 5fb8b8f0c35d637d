"""A job as callers see it: `describe` turns a record into a `JobView` (no owner, no file names), the
model that the answers are dumped from and the OpenAPI document's Job schema is generated from."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from service.jobs.store import Job, JobStatus

Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


def _left_out_when_none(description: str):
    """A field left out of the answer when there is none, rather than sent as null: in the schema it is
    optional, and never null."""
    return Field(default=None, exclude_if=_is_none, description=description)


def _is_none(value: object) -> bool:
    return value is None


class JobProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    total: int = Field(ge=0, description="the steps of the whole run; 0 until it starts")


class JobView(BaseModel):
    """A job's status and progress. `queue_position` is always there, so that a client can read it without
    checking: null once the job left the queue (running or finished)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    status: JobStatus
    progress: JobProgress
    queue_position: int | None = Field(
        ge=0, description="requests waiting ahead of this job (0: next); null once it left the queue"
    )
    seed: int = Field(ge=0)
    error: str | SkipJsonSchema[None] = _left_out_when_none("why the job failed or was canceled")
    result_type: Literal["image/png", "image/gif"] | SkipJsonSchema[None] = _left_out_when_none("once succeeded")
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


def describe(job: Job, position: int | None) -> JobView:
    return JobView(
        id=job.id,
        status=job.status,
        progress=JobProgress(step=job.step, total=job.total),
        queue_position=position if job.status == JobStatus.QUEUED else None,
        seed=job.seed,
        error=job.error or None,
        result_type=job.result_type,
        created_at=_iso(job.created_at),
        started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at),
    )


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"
