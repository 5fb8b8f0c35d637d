"""What one generation is asked to do and what it gives back, and the events it reports while it runs.
No torch here: the service layer builds requests and reads results without loading the model's libraries."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

# The samplers a request may name, with the label AUTOMATIC1111 writes for each (its `Sampler:` field).
# pipeline_runner.py maps the same names to diffusers' scheduler classes.
SAMPLERS = {
    "unipc": "UniPC",
    "dpmpp_2m": "DPM++ 2M",
    "euler_a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
}


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs, already validated; `control_images` are the Canny edge maps."""

    request_id: str
    control_images: tuple[Image.Image, ...]
    prompt: str
    negative_prompt: str = ""
    sensitivity: float = 1.0
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    control_start: float = 0.0
    control_end: float = 1.0
    refine_strength: float = 0.3
    scheduler: str = "unipc"
    progress_gif: bool = False
    # LoRAs as (name, weight) pairs sorted by name (lora_library.LoraSet); requests share a run only with the same set.
    loras: tuple[tuple[str, float], ...] = ()
    # The caller's full recipe (thresholds and resolution included), written into the output's metadata.
    recipe: dict = field(default_factory=dict, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.control_images[0].size

    @property
    def refine_steps(self) -> int:
        """The steps img2img runs at this strength; under one step, refinement is skipped."""
        return int(self.steps * self.refine_strength)


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA a result was made with, as the recipe records it. Its file's hashes (file_reading.FileHashes)
    are computed in the background while the run goes on; the recipe, written after it and off the GPU's
    thread, waits for them."""

    name: str
    weight: float
    hashes: Future = field(compare=False, repr=False)

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's Lora hash: twelve hex digits of the SHA-256 of the file's tensors."""
        return (self.hashes.result().tensors_sha256 or "")[:12]


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[Image.Image, ...]
    seconds: float
    # With `progress_gif`: the picture after every denoising step, decoded from the latents.
    step_previews: tuple[Image.Image, ...] = ()
    loras: tuple[AppliedLora, ...] = ()


@dataclass(frozen=True)
class Canceled:
    """A request of a batch that dropped out: its event handler raised GenerationCanceled."""

    message: str


@dataclass(frozen=True)
class Started:
    """The request's run began; it will take `total` denoising steps (both passes)."""

    total: int


@dataclass(frozen=True)
class Stepped:
    """`step` of `total` steps are done; `preview()` decodes the request's first picture as it looks now
    (it costs a VAE decode, so a handler calls it only when it shows the picture)."""

    step: int
    total: int
    preview: Callable[[], Image.Image]


GenerationEvent = Started | Stepped
# Called on the GPU's thread; raising GenerationCanceled stops the request at this step.
EventHandler = Callable[[GenerationEvent], None]
