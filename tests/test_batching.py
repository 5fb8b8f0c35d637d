"""Dynamic batching: requests that share size, steps and sampler run together, each keeping its own
values, with the same pictures as when run alone."""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.worker import GenerationWorker
from stable_diffusion.errors import GenerationCanceled
from stable_diffusion.pipeline_runner import PipelineRunner
from stable_diffusion.recipe import Canceled
from tests.doubles import Gated, recording, steps_of
from tests.figures import record
from tests.test_models import edge_request

DIFFERENT = [
    {"prompt": "a lighthouse", "seed": 3},
    {"prompt": "a red barn", "negative_prompt": "fog", "seed": 9, "guidance_scale": 3.0, "sensitivity": 0.4},
    {"prompt": "a castle", "seed": 1, "guidance_scale": 12.0, "control_start": 0.25, "control_end": 0.75},
    {"prompt": "a lighthouse", "seed": 3, "refine_strength": 0.5, "sensitivity": 1.7},
]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_picture(batched, alone) -> None:
    """Equal within float tolerance: batched convolutions may round differently in the last bits."""
    difference = np.abs(pixels(batched) - pixels(alone))
    assert difference.max() <= 3 and difference.mean() < 0.2, (difference.max(), difference.mean())


def test_a_batched_result_equals_the_same_request_run_alone(pipeline_runner):
    requests = [edge_request(request_id=f"r{index}", **values) for index, values in enumerate(DIFFERENT)]
    batched = pipeline_runner.run_batch(requests, [None] * len(requests))
    alone = [pipeline_runner.run(request) for request in requests]
    for together, single in zip(batched, alone, strict=True):
        assert_same_picture(together.images[0], single.images[0])
    # ...and the per-sample values did act: no two pictures alike.
    flat = [pixels(result.images[0]).tobytes() for result in batched]
    assert len(set(flat)) == len(flat)


# Cancel points of a 4-step request: before its first step, during the first pass, and (when it
# refines at 0.5, 2 more steps) during the second.
CANCEL_AT = {"before it starts": 0, "in pass 1": 2, "in pass 2": 5}
CANCEL_CASES = [
    (neighbour, refine, when, first)
    for neighbour in (0.0, 0.5)
    for refine in (0.0, 0.5)
    for when in CANCEL_AT
    if refine or when != "in pass 2"
    for first in (True, False)
]


@pytest.fixture(scope="module")
def alone(pipeline_runner):
    """The neighbour's picture run alone, once per refine strength."""
    return {
        strength: pipeline_runner.run(edge_request(request_id="keep", seed=5, refine_strength=strength)).images[0]
        for strength in (0.0, 0.5)
    }


@pytest.mark.parametrize(
    ("neighbour", "refine", "when", "canceled_first"), CANCEL_CASES,
    ids=[f"neighbour{n}-refine{r}-{w.replace(' ', '_')}-{'first' if f else 'last'}" for n, r, w, f in CANCEL_CASES],
)
def test_a_canceled_request_drops_out_and_only_it(pipeline_runner, alone, neighbour, refine, when, canceled_first):
    keep = edge_request(request_id="keep", seed=5, refine_strength=neighbour)
    drop = edge_request(request_id="drop", seed=6, refine_strength=refine)
    seen = []

    def cancel(event):
        done, _ = steps_of(event)
        seen.append(done)
        if done == CANCEL_AT[when]:
            raise GenerationCanceled("Canceled while running.")

    progress = []
    batch = [("keep", keep, recording(progress)), ("drop", drop, cancel)]
    names, requests, on_steps = zip(*(batch[::-1] if canceled_first else batch), strict=True)
    outcomes = dict(zip(names, pipeline_runner.run_batch(list(requests), list(on_steps)), strict=True))
    assert isinstance(outcomes["drop"], Canceled)
    assert seen[-1] == CANCEL_AT[when], "the canceled request was told of steps after it canceled"
    # The neighbour finishes as if it had run alone, whatever its companion did.
    assert len(outcomes["keep"].images) == 1
    assert_same_picture(outcomes["keep"].images[0], alone[neighbour])
    total = keep.steps + keep.refine_steps
    assert progress == [(done, total) for done in range(total + 1)]
    record(cancel_in_batch_combinations=1)


@pytest.mark.parametrize("scheduler", ["unipc", "dpmpp_2m", "euler_a", "euler", "ddim"])
def test_different_refine_strengths_refine_in_one_run_each_as_if_alone(pipeline_runner, scheduler):
    # Of 10 steps, refinement runs the last 5, 3, 8 and 0 (none); ControlNet windows are shares of those.
    values = [
        {"refine_strength": 0.5, "seed": 1},
        {"refine_strength": 0.3, "seed": 2, "control_start": 0.4, "sensitivity": 0.6},
        {"refine_strength": 0.8, "seed": 3, "guidance_scale": 4.0, "control_end": 0.5},
        {"refine_strength": 0.0, "seed": 4},
    ]
    requests = [edge_request(request_id=f"r{i}", steps=10, scheduler=scheduler, **v) for i, v in enumerate(values)]
    progress = [[] for _ in requests]
    unet_batches = []
    hook = pipeline_runner.pipelines.generate.unet.register_forward_hook(
        lambda module, args, output: unet_batches.append(args[0].shape[0])
    )
    try:
        batched = pipeline_runner.run_batch(
            requests, [recording(seen) for seen in progress]
        )
    finally:
        hook.remove()
    # 10 steps for all four, then one refine run as long as the strongest, for the three that refine.
    assert unet_batches == [2 * 4] * 10 + [2 * 3] * 8
    for request, seen in zip(requests, progress, strict=True):
        total = request.steps + request.refine_steps
        assert seen == [(done, total) for done in range(total + 1)]
    for request, together in zip(requests, batched, strict=True):
        assert_same_picture(together.images[0], pipeline_runner.run(request).images[0])


class CountingBatches(Gated):
    """Records the request ids of every batch; runs start at once unless `gated` (then at `open()`)."""

    def __init__(self, service: PipelineRunner, gated: bool = False) -> None:
        super().__init__(service)
        self.batches: list[list[str]] = []
        self.started_at: list[float] = []
        if not gated:
            self.open()

    def run_batch(self, requests, on_events):
        self.batches.append([request.request_id for request in requests])
        self.started_at.append(time.monotonic())
        return super().run_batch(requests, on_events)


def run_through_worker(pipeline_runner, requests, **options) -> list[list[str]]:
    service = CountingBatches(pipeline_runner)
    worker = GenerationWorker(lambda: service, queue_size=16, **options)
    try:
        assert worker.wait_until_loaded(30)
        futures = [worker.submit(request) for request in requests]
        for future in futures:
            future.result(timeout=120)
    finally:
        worker.close(timeout=60)
    return service.batches


def test_the_worker_batches_queued_requests_that_can_share_a_run(pipeline_runner):
    requests = [edge_request(request_id=f"a{index}", seed=index) for index in range(3)]
    other_steps = edge_request(request_id="b", steps=6)
    batches = run_through_worker(pipeline_runner, [*requests, other_steps], max_batch=8, batch_wait_s=0.5)
    assert batches == [["a0", "a1", "a2"], ["b"]]


def test_a_batch_holds_at_most_max_batch_pictures(pipeline_runner):
    requests = [edge_request(request_id=f"a{index}", seed=index) for index in range(5)]
    batches = run_through_worker(pipeline_runner, requests, max_batch=2, batch_wait_s=0.5)
    assert batches == [["a0", "a1"], ["a2", "a3"], ["a4"]]


def test_batching_off_runs_one_request_at_a_time(pipeline_runner):
    requests = [edge_request(request_id=f"a{index}", seed=index) for index in range(3)]
    assert run_through_worker(pipeline_runner, requests, max_batch=1) == [["a0"], ["a1"], ["a2"]]


def test_gif_frames_share_one_run_and_each_equals_its_frame_run_alone(pipeline_runner):
    frames = edge_request().control_images[0], edge_request().control_images[0].rotate(180)
    gif = edge_request(request_id="gif", control_images=frames, seed=4)
    unet_batches = []
    hook = pipeline_runner.pipelines.generate.unet.register_forward_hook(
        lambda module, args, output: unet_batches.append(args[0].shape[0])
    )
    try:
        together = pipeline_runner.run(gif)
    finally:
        hook.remove()
    # Both frames, conditional and unconditional, at every step of both passes.
    assert set(unet_batches) == {2 * len(frames)}
    for frame, image in zip(frames, together.images, strict=True):
        alone = pipeline_runner.run(edge_request(request_id="frame", control_images=(frame,), seed=4))
        assert_same_picture(image, alone.images[0])


def test_a_request_that_cannot_join_is_not_overtaken_by_later_ones_that_can(pipeline_runner):
    service = CountingBatches(pipeline_runner, gated=True)
    worker = GenerationWorker(lambda: service, queue_size=16, max_batch=8, batch_wait_s=0.2)
    try:
        assert worker.wait_until_loaded(30)
        first = worker.submit(edge_request(request_id="a0"))
        assert service.started.wait(60)
        # While a0 runs: b (other steps) queues first, then two that could share a run with each other.
        later = [worker.submit(edge_request(request_id=name, **values))
                 for name, values in (("b", {"steps": 6}), ("a1", {}), ("a2", {"seed": 8}))]
        service.open()
        for future in (first, *later):
            future.result(timeout=120)
    finally:
        worker.close(timeout=60)
    assert service.batches == [["a0"], ["b"], ["a1", "a2"]]


def test_companions_are_awaited_at_most_the_wait_bound_however_many_others_arrive(pipeline_runner):
    wait = 1.5
    service = CountingBatches(pipeline_runner)
    worker = GenerationWorker(lambda: service, queue_size=16, max_batch=8, batch_wait_s=wait)
    try:
        assert worker.wait_until_loaded(30)
        submitted = time.monotonic()
        futures = [worker.submit(edge_request(request_id="a0", steps=2))]
        # Within a0's window: one companion, and requests that cannot join, none of which extends it.
        for name, values in (("b", {"steps": 3}), ("a1", {"steps": 2, "seed": 8}), ("c", {"steps": 4})):
            time.sleep(wait / 4)
            futures.append(worker.submit(edge_request(request_id=name, **values)))
        for future in futures:
            future.result(timeout=120)
    finally:
        worker.close(timeout=60)
    assert service.batches == [["a0", "a1"], ["b"], ["c"]]
    # a0 waited its whole window for companions, and not much longer (slack for a busy test machine).
    assert wait - 0.05 <= service.started_at[0] - submitted <= wait + 0.5
