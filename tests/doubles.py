"""Test doubles at the GPU edge: the real tiny pipeline, with the test deciding when a run may start."""

from __future__ import annotations

import threading

from stable_diffusion.pipeline_runner import PipelineRunner
from stable_diffusion.recipe import GenerationEvent, Stepped


def steps_of(event: GenerationEvent) -> tuple[int, int]:
    """(steps done, total): (0, total) when the run starts."""
    return (event.step if isinstance(event, Stepped) else 0, event.total)


def recording(progress: list) -> object:
    """An event handler that appends each event's (steps done, total) to `progress`."""
    return lambda event: progress.append(steps_of(event))


class Gated(PipelineRunner):
    """Each run, once started, waits before its first step until `open()`; `started` is set when a run
    reaches the gate."""

    def __init__(self, service: PipelineRunner) -> None:
        self.__dict__.update(service.__dict__)
        self.gate = threading.Event()
        self.started = threading.Event()

    def open(self) -> None:
        self.gate.set()

    def run_batch(self, requests, on_events):
        def then_wait(on_event):
            def event_then_wait(event):
                if on_event is not None:
                    on_event(event)
                if not isinstance(event, Stepped):
                    self.started.set()
                    if not self.gate.wait(60):
                        raise TimeoutError("the test never opened the gate")

            return event_then_wait

        return super().run_batch(requests, [then_wait(on_event) for on_event in on_events])
