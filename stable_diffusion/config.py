"""What loading the model needs to know, and nothing else of the service's settings (no API keys, no
paths): built by the service from its settings, read by pipeline_initialization.py and acceleration.py.
No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SpeedConfig:
    """CHANNELS_LAST (auto: on a GPU) and TORCH_COMPILE (off or a torch.compile mode)."""

    channels_last: str = "auto"
    torch_compile: str = "off"


@dataclass(frozen=True)
class ModelConfig:
    """What loading needs to know, and nothing else of the service's settings. The values are those of
    the settings of the same names (SD_MODEL, CONTROLNET_MODEL, DEVICE, DTYPE, CHANNELS_LAST, TORCH_COMPILE, ...)."""

    sd_model: str
    controlnet_model: str
    device: str = "auto"
    dtype: str = "auto"
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    # ALLOW_PICKLE_CHECKPOINTS: read .ckpt files, which run code as they load.
    allow_pickle_checkpoints: bool = False
    # LORA_DIR and LORA_CACHE: where LoRA files are, and how many stay loaded.
    lora_dir: Path | None = None
    lora_cache: int = 8
