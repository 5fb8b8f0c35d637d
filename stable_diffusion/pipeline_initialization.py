"""Builds the ControlNet pipeline and its refiner once: from the hub, a local folder, or the tiny model."""

from __future__ import annotations

import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel

from stable_diffusion.acceleration import Speed, apply_speed_settings
from stable_diffusion.checkpoints import (
    ModelFile,
    checkpoint_problem,
    is_checkpoint_file,
    load_controlnet_file,
    load_sd_file,
    load_tokenizer,
)
from stable_diffusion.config import ModelConfig
from stable_diffusion.errors import ModelLoadError

__all__ = ["ModelLoadError", "Pipelines", "load_pipelines"]

TINY_MODEL = "tiny"
TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny_model"
# The real SD 1.5 architecture with random weights, for benchmarks (speed does not depend on weights).
FULL_SIZE_RANDOM_MODEL = "sd15-random"
FULL_SIZE_MODEL_DIR = Path(__file__).resolve().parent / "sd15_architecture"
RANDOM_MODELS = {TINY_MODEL: TINY_MODEL_DIR, FULL_SIZE_RANDOM_MODEL: FULL_SIZE_MODEL_DIR}
TINY_SEED = 0
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_CHECK_TIMEOUT_S = 3.0
# The Canny ControlNet for SD 1.5 as one file, as AUTOMATIC1111's ControlNet extension keeps it.
SD15_CANNY_FILE = "control_v11p_sd15_canny_fp16.safetensors"

log = logging.getLogger(__name__)


@dataclass
class Pipelines:
    """The loaded text-to-image pipeline, its img2img refiner sharing the same weights, and where they run."""

    generate: StableDiffusionControlNetPipeline
    refine: StableDiffusionControlNetImg2ImgPipeline
    device: torch.device
    dtype: torch.dtype
    model_name: str
    speed: Speed
    # The base model's and the ControlNet's names: a file's stem, a hub id, a folder or a built-in model.
    names: tuple[str, str] = ("", "")
    # SD_MODEL and CONTROLNET_MODEL when they are single files (their size and hash); None otherwise.
    sd_file: ModelFile | None = None
    controlnet_file: ModelFile | None = None
    # LORA_DIR and LORA_CACHE, for the generator's LoRA adapters.
    lora_dir: Path | None = None
    lora_cache: int = 8
    # A built-in model (tiny, sd15-random): its pictures are noise shaped by the edges, by design.
    random_weights: bool = False

    @property
    def needs_warm_up(self) -> bool:
        """Compiled models compile on their first run, and a GPU picks its kernels on its first run."""
        return self.speed.compile_mode != "off" or self.device.type == "cuda"


def resolve_device(setting: str) -> torch.device:
    """`auto` picks a CUDA or ROCm GPU (torch reports both as `cuda`), then Apple's MPS, then the CPU."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if setting == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    device = torch.device(setting)
    missing = (device.type == "cuda" and not cuda) or (device.type == "mps" and not mps)
    if missing or (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(
            f"DEVICE={setting} but torch sees no such device; install the matching torch build "
            "(see README), pick a GPU that exists (cuda:0 is the first) or set DEVICE=auto."
        )
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on a GPU and float32 on the CPU, where float16 is slow or unsupported."""
    if setting == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if setting == "float16" and device.type == "cpu":
        raise ModelLoadError("DTYPE=float16 is not supported on the CPU; use float32, bfloat16 or auto.")
    return getattr(torch, setting)


def load_pipelines(config: ModelConfig) -> Pipelines:
    """Load the configured weights onto the configured device, ready to generate."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.sd_model in RANDOM_MODELS:
        pipe = build_random_pipeline(RANDOM_MODELS[config.sd_model])
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        model_name, files = config.sd_model, {}
        names = (config.sd_model, config.sd_model)
    else:
        pipe, files = _load_pretrained(config, dtype)
        settings = (config.sd_model, config.controlnet_model)
        names = tuple(files[name].name if name in files else name for name in settings)
        model_name = " + ".join(names)
    pipe = pipe.to(device)
    # Inference only. Frozen from the start, as peft freezes a model it adds a LoRA to: a compiled model
    # would otherwise see its weights change under it and compile again.
    for model in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    speed = apply_speed_settings(pipe, device, config.speed)
    pipe.set_progress_bar_config(disable=True)
    refine = StableDiffusionControlNetImg2ImgPipeline.from_pipe(pipe)
    refine.set_progress_bar_config(disable=True)
    log.info("loaded %s on %s as %s (%s)", model_name, device, dtype, speed)
    return Pipelines(
        pipe, refine, device, dtype, model_name, speed, names, files.get(config.sd_model),
        files.get(config.controlnet_model), config.lora_dir, config.lora_cache,
        random_weights=config.sd_model in RANDOM_MODELS,
    )


def _load_pretrained(
    config: ModelConfig, dtype: torch.dtype
) -> tuple[StableDiffusionControlNetPipeline, dict[str, ModelFile]]:
    """The pipeline, and the single files it was loaded from (by setting value) with their hashes."""
    sd_model, controlnet_model = config.sd_model, config.controlnet_model
    files, sources = check_model_settings(config)
    allow_pickle = config.allow_pickle_checkpoints
    loaded: dict[str, ModelFile] = {}
    if "CONTROLNET_MODEL" in files:
        controlnet, loaded[controlnet_model] = load_controlnet_file(files["CONTROLNET_MODEL"], allow_pickle, dtype)
    else:
        controlnet = _from_pretrained(ControlNetModel, "CONTROLNET_MODEL", controlnet_model, sources, torch_dtype=dtype)
    if "SD_MODEL" in files:
        pipe, loaded[sd_model] = load_sd_file(files["SD_MODEL"], allow_pickle, dtype, controlnet)
    else:
        pipe = _from_pretrained(
            StableDiffusionControlNetPipeline,
            "SD_MODEL",
            sd_model,
            sources,
            controlnet=controlnet,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    widths = pipe.unet.config.cross_attention_dim, controlnet.config.cross_attention_dim
    if widths[0] != widths[1]:
        raise ModelLoadError(
            f"SD_MODEL={sd_model!r} and CONTROLNET_MODEL={controlnet_model!r} do not fit together: the model attends "
            f"to text {widths[0]} wide, the ControlNet to {widths[1]}. Pick a ControlNet made for this model."
        )
    return pipe, loaded


def check_model_settings(config: ModelConfig) -> tuple[dict[str, Path], dict[str, str]]:
    """Every model setting checked before any weights load or download: the single files (by setting) and
    where each other model comes from (`folder`, `hub` or `cache`). A ModelLoadError holds one line for each
    setting with a problem, so a bad file is never hidden behind another setting's Hub error, and without a
    network the cache is read at once instead of after the Hub's retries."""
    settings = {"SD_MODEL": config.sd_model, "CONTROLNET_MODEL": config.controlnet_model}
    files = {setting: Path(name).expanduser() for setting, name in settings.items() if is_checkpoint_file(name)}
    problems = [
        problem
        for setting, path in files.items()
        if (problem := checkpoint_problem(setting, path, config.allow_pickle_checkpoints))
    ]
    others = {setting: name for setting, name in settings.items() if setting not in files}
    hub_reachable = bool(others) and _hub_reachable()
    sources = {}
    for setting, name in others.items():
        try:
            sources[setting] = _model_source(setting, name, hub_reachable, sd_file="SD_MODEL" in files)
        except ModelLoadError as exc:
            problems.append(str(exc))
    if problems:
        raise ModelLoadError("\n".join(problems))
    return files, sources


def _hub_reachable() -> bool:
    """One quick look instead of the Hub client's retries: False with HF_HUB_OFFLINE set or no connection."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CHECK_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _model_source(setting: str, name: str, hub_reachable: bool, sd_file: bool = False) -> str:
    """`folder`, `hub` or `cache` (the Hub's local cache, the Hub being out of reach), or a ModelLoadError.
    `sd_file`: SD_MODEL is a single file, which wants a ControlNet file beside it to start offline."""
    where = Path(name).expanduser()
    if where.is_dir():
        return "folder"
    if where.exists() or not HUB_ID.fullmatch(name):
        raise ModelLoadError(
            f"Could not load {setting}={name!r}: it is not a local diffusers folder, not a checkpoint file "
            f"(.safetensors), not a Hugging Face Hub id (owner/name), and not a built-in model "
            f"({', '.join(RANDOM_MODELS)}). Set {setting} to one of those; SD_MODEL={TINY_MODEL} tries the "
            "service offline."
        )
    if hub_reachable:
        return "hub"
    index = "model_index.json" if setting == "SD_MODEL" else "config.json"
    if isinstance(huggingface_hub.try_to_load_from_cache(name, index), str):
        return "cache"
    remedy = (
        f"With a single-file SD_MODEL, set {setting} to a ControlNet file too (for SD 1.5: "
        f"{SD15_CANNY_FILE}; see the README's \"Your own models\") to start offline"
        if setting == "CONTROLNET_MODEL" and sd_file
        else f"Set {setting} to a local diffusers folder, or set SD_MODEL={TINY_MODEL} to try the service offline"
    )
    raise ModelLoadError(
        f"Could not load {setting}={name!r}: the Hugging Face Hub ({huggingface_hub.constants.ENDPOINT}) cannot "
        "be reached (no network, or HF_HUB_OFFLINE is set) and the model is not in the local Hub cache. "
        f"Connect once to download it. {remedy}."
    )


def _from_pretrained(loader, setting: str, name: str, sources: dict[str, str], **kwargs):
    try:
        return loader.from_pretrained(name, local_files_only=sources[setting] != "hub", **kwargs)
    except (OSError, ValueError) as exc:
        where = Path(name).expanduser()
        local = (
            f"{where} exists but is not a diffusers-format folder"
            if where.exists()
            else "it is not a local folder"
        )
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"Could not load {setting}={name!r}: {local}, and the Hugging Face Hub could not provide it "
            f"({reason}). Set {setting} to a local diffusers folder or a hub id that can be downloaded "
            f"(set HF_TOKEN for gated models), or set SD_MODEL={TINY_MODEL} to try the service offline."
        ) from exc


def build_tiny_pipeline() -> StableDiffusionControlNetPipeline:
    """A random-weight pipeline with the real architecture at toy width, from the configs in tiny_model/."""
    return build_random_pipeline(TINY_MODEL_DIR)


def build_random_pipeline(config_dir: Path) -> StableDiffusionControlNetPipeline:
    """A random-weight pipeline from the component configs in `config_dir`, with the tiny tokenizer.

    Deterministic: every component is seeded before it is built, so two builds give the same weights.
    """

    def seeded(build):
        torch.manual_seed(TINY_SEED)
        # Inference mode, as from_pretrained leaves a model: a new module starts in training mode.
        return build().eval()

    config = {name: json.loads((config_dir / f"{name}.json").read_text()) for name in
              ("unet", "controlnet", "vae", "text_encoder", "scheduler")}
    return StableDiffusionControlNetPipeline(
        vae=seeded(lambda: AutoencoderKL(**config["vae"])),
        text_encoder=seeded(lambda: CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))),
        tokenizer=load_tokenizer(TINY_MODEL_DIR),
        unet=seeded(lambda: UNet2DConditionModel(**config["unet"])),
        controlnet=seeded(lambda: _wake_zero_convolutions(ControlNetModel(**config["controlnet"]))),
        scheduler=UniPCMultistepScheduler(**config["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _wake_zero_convolutions(controlnet: ControlNetModel) -> ControlNetModel:
    """A new ControlNet's zero convolutions (after the edge-map encoder and on every output) would make
    it ignore the edge map; random weights there make the tiny model follow its control image."""
    zero_convolutions = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for conv in zero_convolutions:
            torch.nn.init.normal_(conv.weight, std=0.5)
    return controlnet


def save_tiny_model(folder: Path) -> tuple[Path, Path]:
    """Write the tiny model as diffusers folders; returns the paths for SD_MODEL and CONTROLNET_MODEL."""
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(folder / "sd")
    pipe.controlnet.save_pretrained(folder / "controlnet")
    return folder / "sd", folder / "controlnet"
