"""Test doubles at the GPU edge: the real tiny pipeline, with the test deciding when a run may start."""

from __future__ import annotations

import threading

from stable_diffusion.pipeline_service import PipelineService


class Gated(PipelineService):
    """Each run, once started, waits before its first step until `open()`; `started` is set when a run
    reaches the gate."""

    def __init__(self, service: PipelineService) -> None:
        self.__dict__.update(service.__dict__)
        self.gate = threading.Event()
        self.started = threading.Event()

    def open(self) -> None:
        self.gate.set()

    def run_batch(self, requests, on_steps):
        def then_wait(on_step):
            def step_then_wait(done, total, preview):
                if on_step is not None:
                    on_step(done, total, preview)
                if done == 0:
                    self.started.set()
                    if not self.gate.wait(60):
                        raise TimeoutError("the test never opened the gate")

            return step_then_wait

        return super().run_batch(requests, [then_wait(on_step) for on_step in on_steps])
