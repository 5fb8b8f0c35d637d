"""Single-file checkpoints, as AUTOMATIC1111 and ComfyUI users keep them: a Stable Diffusion 1.5 model or a
ControlNet in the original (CompVis / lllyasviel) layout, one `.safetensors` file, loaded offline into the
architecture whose configs ship in this package. A `.ckpt` is a Python pickle, which runs code as it loads,
so it is read only when the operator allows it (ALLOW_PICKLE_CHECKPOINTS)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from safetensors import SafetensorError
from safetensors.torch import load
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stable_diffusion.errors import ModelLoadError, first_line
from stable_diffusion.file_reading import HASHES, FileChanged, FileHashes, read_safetensors_header, read_whole

SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (SAFE_SUFFIX, *PICKLE_SUFFIXES)
PACKAGE_DIR = Path(__file__).resolve().parent
# The shipped architectures a file may be, told apart by their cross-attention width (the text encoder's).
ARCHITECTURES = {"SD 1.5": PACKAGE_DIR / "sd15_architecture", "tiny": PACKAGE_DIR / "tiny_model"}
# The original layout's prefixes of the UNet and the CLIP text encoder.
UNET_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer."
# A checkpoint is read whole into memory; SDXL files are about 7 GB.
MAX_CHECKPOINT_BYTES = 40 << 30


@dataclass(frozen=True)
class ModelFile:
    """A model file as /models and the PNG recipe name it: its stem, size and hashes, which are computed in the
    background from the bytes loaded (file_reading.py). AUTOMATIC1111's `Model hash` is the first ten hex
    digits of the SHA-256 of the whole file."""

    name: str
    size: int
    hashes: Future[FileHashes] = field(compare=False, repr=False)

    @property
    def sha256(self) -> str | None:
        """None until the hashing is done."""
        return self.hashes.result().sha256 if self.hashes.done() else None

    @property
    def short_hash(self) -> str:
        """Waits for the hashing: the recipe is written after a run, off the GPU's thread."""
        return self.hashes.result().sha256[:10]


def is_checkpoint_file(name: str) -> bool:
    """A setting names a single file (rather than a folder or a hub id) by its suffix."""
    return name.lower().endswith(CHECKPOINT_SUFFIXES)


def checkpoint_problem(setting: str, path: Path, allow_pickle: bool) -> str | None:
    """What is wrong with a checkpoint file, seen from the file and its safetensors header alone (no weights
    read): the one line start-up reports before anything else is loaded or downloaded; None when nothing shows."""
    where = f"{setting}={path}"
    problem = _file_problem(setting, path, allow_pickle)
    if problem or path.suffix.lower() != SAFE_SUFFIX:
        return problem
    try:
        header = read_safetensors_header(path, follow_links=True)
    except ValueError as exc:
        return _unreadable(where, str(exc))
    except OSError as exc:
        return f"Could not load {where}: {exc.strerror or exc}."
    return _kind_problem(setting, path, describe_contents(header))


def read_checkpoint(setting: str, path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], ModelFile]:
    """The file's tensors by name and the file, or a ModelLoadError naming the setting and what the file is.
    The file is read whole, one version of it (file_reading.py): one changed while read is refused, never
    mapped, so truncating it cannot kill the process."""
    where = f"{setting}={path}"
    problem = _file_problem(setting, path, allow_pickle)
    if problem:
        raise ModelLoadError(problem)
    try:
        data, version = read_whole(path, MAX_CHECKPOINT_BYTES)
    except FileChanged:
        raise ModelLoadError(
            f"Could not load {where}: the file changed while it was read; start again once it is copied whole."
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"Could not load {where}: {exc.strerror or exc}.") from None
    model_file = ModelFile(path.stem, version.size, HASHES.of_bytes(version, data, tensors=False))
    pickled = path.suffix.lower() != SAFE_SUFFIX
    return (_read_pickle(where, data) if pickled else _read_safetensors(where, data)), model_file


def _file_problem(setting: str, path: Path, allow_pickle: bool) -> str | None:
    """A missing or empty file, or a pickle not allowed: seen without opening the file."""
    where = f"{setting}={path}"
    if not path.is_file():
        return f"Could not load {where}: no such file. Set {setting} to an existing checkpoint file."
    if path.stat().st_size == 0:
        return f"Could not load {where}: the file is empty. Copy the checkpoint again."
    if path.suffix.lower() != SAFE_SUFFIX and not allow_pickle:
        return (
            f"Refusing {where}: a {path.suffix} file is a Python pickle, which can run any code as it loads. "
            f"Use the model's .safetensors file, or set ALLOW_PICKLE_CHECKPOINTS=true if you trust this one."
        )
    return None


def _unreadable(where: str, reason: str) -> str:
    return (
        f"Could not load {where}: it is not a readable .safetensors file ({reason}); it may be "
        "truncated or another kind of file renamed. Download it again."
    )


def _read_safetensors(where: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelLoadError(_unreadable(where, first_line(exc))) from None


def _read_pickle(where: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged pickle raises whatever its bytes make of it
        raise ModelLoadError(f"Could not load {where}: not a readable checkpoint ({first_line(exc)}).") from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"Could not load {where}: it holds a {type(checkpoint).__name__}, not named tensors.")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def describe_contents(checkpoint: Mapping[str, object]) -> str:
    """What kind of model the file holds, in words: SD 1.x, SD 2.x, SDXL, a ControlNet, a LoRA, or unknown.
    Only the tensors' names count, so a safetensors header says it as well as the tensors."""
    keys = checkpoint.keys()
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return "an SDXL model"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "an SD 2.x model (its text encoder is OpenCLIP)"
    if any("input_hint_block" in key for key in keys):
        return "a ControlNet"
    if any(key.startswith(("lora_unet_", "lora_te_")) or ".lora_" in key for key in keys):
        return "a LoRA"
    if any(key.startswith(UNET_PREFIX) for key in keys) and any(key.startswith(CLIP_PREFIX) for key in keys):
        return "an SD 1.x model"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"no Stable Diffusion weights (its first tensors: {sample})"


def load_sd_file(
    path: Path, allow_pickle: bool, dtype: torch.dtype, controlnet: ControlNetModel
) -> tuple[StableDiffusionControlNetPipeline, ModelFile]:
    """An SD 1.5 single file as a pipeline, with the ControlNet given."""
    checkpoint, model_file = read_checkpoint("SD_MODEL", path, allow_pickle)
    _raise_problem(_kind_problem("SD_MODEL", path, describe_contents(checkpoint)))
    folder = _architecture("SD_MODEL", path, checkpoint)
    unet = _component("SD_MODEL", path, UNet2DConditionModel, checkpoint, folder / "unet.json", dtype)
    vae = _component("SD_MODEL", path, AutoencoderKL, checkpoint, folder / "vae.json", dtype)
    tokenizer = load_tokenizer(folder)
    text_encoder = _text_encoder(path, checkpoint, folder, tokenizer, dtype)
    scheduler = UniPCMultistepScheduler.from_config(json.loads((folder / "scheduler.json").read_text()))
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, model_file


def load_controlnet_file(path: Path, allow_pickle: bool, dtype: torch.dtype) -> tuple[ControlNetModel, ModelFile]:
    checkpoint, model_file = read_checkpoint("CONTROLNET_MODEL", path, allow_pickle)
    _raise_problem(_kind_problem("CONTROLNET_MODEL", path, describe_contents(checkpoint)))
    folder = _architecture("CONTROLNET_MODEL", path, checkpoint)
    controlnet = _component("CONTROLNET_MODEL", path, ControlNetModel, checkpoint, folder / "controlnet.json", dtype)
    return controlnet, model_file


def _kind_problem(setting: str, path: Path, contents: str) -> str | None:
    """SD_MODEL must hold an SD 1.x model and CONTROLNET_MODEL a ControlNet; what else the file holds, in words."""
    if setting == "SD_MODEL" and contents != "an SD 1.x model":
        hint = " Set it as CONTROLNET_MODEL." if contents == "a ControlNet" else (
            " Put it in LORA_DIR." if contents == "a LoRA" else " This service runs SD 1.5 models."
        )
        return f"Could not load SD_MODEL={path}: the file holds {contents}.{hint}"
    if setting == "CONTROLNET_MODEL" and contents != "a ControlNet":
        hint = " Set it as SD_MODEL." if contents == "an SD 1.x model" else ""
        return f"Could not load CONTROLNET_MODEL={path}: the file holds {contents}, not a ControlNet.{hint}"
    return None


def _raise_problem(problem: str | None) -> None:
    if problem:
        raise ModelLoadError(problem)


def cross_attention_width(checkpoint: dict[str, torch.Tensor]) -> int | None:
    """The width of the text the UNet (or ControlNet) attends to: 768 for SD 1.x."""
    for key, tensor in checkpoint.items():
        if key.endswith("attn2.to_k.weight") and tensor.ndim == 2:
            return tensor.shape[1]
    return None


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer in `folder`/tokenizer (vocab.json, merges.txt)."""
    tokenizer_dir = folder / "tokenizer"
    return CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77)


def _architecture(setting: str, path: Path, checkpoint: dict[str, torch.Tensor]) -> Path:
    """The folder of the shipped architecture the file's weights are made for."""
    width = cross_attention_width(checkpoint)
    for folder in ARCHITECTURES.values():
        if json.loads((folder / "unet.json").read_text())["cross_attention_dim"] == width:
            return folder
    raise ModelLoadError(
        f"Could not load {setting}={path}: its cross-attention width is {width}, which fits none of the "
        f"architectures this service ships ({', '.join(ARCHITECTURES)}; SD 1.5 is 768)."
    )


def _component(setting: str, path: Path, model_class, checkpoint: dict, config: Path, dtype: torch.dtype):
    """One diffusers model from the file, converted from the original layout by diffusers itself."""
    what = model_class.__name__
    try:
        model = model_class.from_single_file(checkpoint, config=str(config), torch_dtype=dtype)
    except Exception as exc:  # diffusers' converters raise KeyError, ValueError, RuntimeError... on a bad file
        raise ModelLoadError(
            f"Could not load {setting}={path}: its {what} weights do not fit the SD 1.5 architecture "
            f"({type(exc).__name__}: {first_line(exc)})."
        ) from None
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise ModelLoadError(
            f"Could not load {setting}={path}: its {what} lacks {len(missing)} weights (first: {missing[0]}); "
            "the file is incomplete."
        )
    return model.eval()


def _text_encoder(
    path: Path, checkpoint: dict, folder: Path, tokenizer: CLIPTokenizer, dtype: torch.dtype
) -> CLIPTextModel:
    config = json.loads((folder / "text_encoder.json").read_text())
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModel(CLIPTextConfig(**config))
    # Files name the tensors `text_model.…` (older transformers); from transformers 5.6 the model has no such
    # wrapper. position_ids is a constant the model makes itself; older files carry it.
    prefix = "text_model." if hasattr(model, "text_model") else ""
    weights = {
        prefix + key.removeprefix("text_model."): value
        for key, value in convert_ldm_clip_checkpoint(checkpoint).items()
        if not key.endswith("position_ids")
    }
    try:
        problems = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"Could not load SD_MODEL={path}: its text encoder weights do not fit ({first_line(exc)})."
        ) from None
    if problems.missing_keys or problems.unexpected_keys:
        first = (problems.missing_keys or problems.unexpected_keys)[0]
        raise ModelLoadError(
            f"Could not load SD_MODEL={path}: its text encoder weights do not fit CLIP ViT-L/14 "
            f"({len(problems.missing_keys)} missing, {len(problems.unexpected_keys)} unexpected; first: {first})."
        )
    return model.to(dtype).eval()
