"""LoRAs on the loaded pipelines: each file of LORA_DIR becomes a peft adapter of the UNet and text encoder
(shared by the generate and refine pipelines), loaded on first use and kept for the next requests, at most
LORA_CACHE of them (the least recently used is dropped). A batch runs with exactly its LoRA set active, or
with the adapters switched off, so that a request without LoRAs gets the base model's pictures."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionControlNetPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load
from transformers.utils import logging as transformers_logging

from stable_diffusion.checkpoints import describe_contents
from stable_diffusion.errors import InvalidField, first_line
from stable_diffusion.file_reading import HASHES, FileHashes, FileVersion
from stable_diffusion.lora_library import MAX_WEIGHT, MIN_WEIGHT, LoraLibrary, LoraSet, family, lora_text_width
from stable_diffusion.recipe import AppliedLora

log = logging.getLogger(__name__)


# The largest magnitude a LoRA may add to a weight at its highest request weight: what half precision holds,
# the precision GPUs run in. A LoRA beyond it (an alpha of 1e38, say) paints only black.
MAX_DELTA = 65504.0
# Refusals remembered per file version, so a bad file is checked once, not on every request naming it.
REFUSALS_KEPT = 256


@dataclass
class _Loaded:
    adapter: str
    version: FileVersion
    hashes: Future[FileHashes]


class LoraAdapters:
    def __init__(self, pipe: StableDiffusionControlNetPipeline, library: LoraLibrary, cache_size: int) -> None:
        self._pipe, self._library, self._cache_size = pipe, library, cache_size
        self._text_width = pipe.unet.config.cross_attention_dim
        self._family = family(self._text_width)
        # By name, least recently used first.
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        # Messages, not exceptions: an exception would keep its frames (the file's bytes, the batch) alive.
        self._refused: OrderedDict[FileVersion, str] = OrderedDict()
        self._serial = 0
        # With TORCH_COMPILE, the UNet's compiled forward while a LoRA batch runs it uncompiled.
        self._compiled_forward = None

    def activate(self, loras: LoraSet) -> tuple[AppliedLora, ...]:
        """Make `loras` the active set (none: adapters off); InvalidField for a file that is missing, is no
        LoRA, or does not fit the model."""
        if not loras:
            if self._loaded and self._compiled_forward is not None:
                # Back to exactly the layers the UNet was compiled with, so that its graphs still hold.
                self._pipe.unload_lora_weights()
                self._loaded.clear()
            elif self._loaded:
                self._pipe.disable_lora()
            self._compiled(True)
            return ()
        self._compiled(False)
        loaded = [self._load(name, keep={name for name, _ in loras}) for name, _ in loras]
        self._pipe.enable_lora()
        self._pipe.set_adapters([entry.adapter for entry in loaded], [weight for _, weight in loras])
        return tuple(
            AppliedLora(name, weight, entry.hashes)
            for (name, weight), entry in zip(loras, loaded, strict=True)
        )

    def _compiled(self, on: bool) -> None:
        """With TORCH_COMPILE, a batch with LoRAs runs the UNet uncompiled: every new adapter, set or weight
        would make torch compile it again (one to two minutes each on a CPU, measured), stalling the queue;
        batches without LoRAs keep the compiled UNet. Without TORCH_COMPILE, nothing to do."""
        unet = self._pipe.unet
        if on and self._compiled_forward is not None:
            unet.forward, self._compiled_forward = self._compiled_forward, None
        elif not on and "forward" in vars(unet):
            self._compiled_forward = vars(unet).pop("forward")

    def _load(self, name: str, keep: set[str]) -> _Loaded:
        """The named LoRA as an adapter: kept from an earlier batch while its file is the same version, else
        read (whole, one version: file_reading.py) and checked. A refused version is refused again unread."""
        version = self._library.version(name)
        entry = self._loaded.get(name)
        if entry is not None and entry.version == version:
            self._loaded.move_to_end(name)
            return entry
        if version in self._refused:
            raise InvalidField(self._refused[version])
        if entry is not None:  # the file changed since it was loaded
            self._drop(name)
        started = time.perf_counter()
        data, version = self._library.read(name)
        try:
            adapter = self._adapter(name, data)
        except InvalidField as refusal:
            self._refused[version] = refusal.message
            while len(self._refused) > REFUSALS_KEPT:
                self._refused.popitem(last=False)
            log.info("refused LoRA %s: %s", name, refusal.message)
            raise
        entry = self._loaded[name] = _Loaded(adapter, version, HASHES.of_bytes(version, data))
        log.info("loaded LoRA %s (%d bytes) in %.2f s", name, version.size, time.perf_counter() - started)
        self._evict(keep)
        return entry

    def _adapter(self, name: str, data: bytes) -> str:
        """The file's bytes as a new adapter of the pipeline; InvalidField saying what is wrong with them."""
        try:
            weights = load(data)
        except (SafetensorError, ValueError) as exc:
            raise InvalidField(
                f"loras: the file of LoRA {name!r} is not a readable .safetensors file ({first_line(exc)}); "
                "replace it in LORA_DIR."
            ) from None
        if not any("lora" in key.lower() for key in weights):
            raise InvalidField(
                f"loras: the file of LoRA {name!r} holds no LoRA weights: it holds {describe_contents(weights)}. "
                "Replace it in LORA_DIR."
            )
        if not all(_finite(tensor) for tensor in weights.values() if tensor.is_floating_point()):
            raise _non_finite(name)
        width = lora_text_width({key: {"shape": list(value.shape)} for key, value in weights.items()})
        if width is not None and width != self._text_width:
            raise InvalidField(
                f"loras: LoRA {name!r} is made for {family(width)}, and this server runs {self._family}; "
                f"use a LoRA made for {self._family}."
            )
        # peft names adapters as module attributes: no dots, so a serial number rather than the file's name.
        self._serial += 1
        adapter = f"lora_{self._serial}"
        try:
            misfit = self._misfit(adapter, self._add_adapter(weights, adapter))
            overflows = not misfit and self._overflows(adapter)
        except torch.OutOfMemoryError:
            self._remove_adapter(adapter)
            raise  # the generator answers it as the GPU's memory, not the file's fault
        except Exception as exc:  # diffusers and peft raise ValueError, KeyError, RuntimeError... for a misfit
            misfit, overflows = f"diffusers could not load it ({type(exc).__name__})", False
        if misfit:
            self._remove_adapter(adapter)
            raise InvalidField(
                f"loras: LoRA {name!r} does not fit {self._family}, the model this server runs: {misfit}. "
                f"Use a LoRA made for {self._family}."
            )
        if overflows:
            self._remove_adapter(adapter)
            raise _non_finite(name)
        return adapter

    def _add_adapter(self, weights: dict, adapter: str) -> dict[str, float]:
        """Load the file as `adapter`; returns, per model, the size of the file's up-projection weights that
        should land there (read from diffusers' own conversion of the file)."""
        state_dict, _ = self._pipe.lora_state_dict(dict(weights))
        expected = {
            prefix: sum(
                float(value.abs().sum()) for key, value in state_dict.items()
                if key.startswith(f"{prefix}.") and key.endswith(".weight") and (".up." in key or "lora_B" in key)
            )
            for prefix in ("unet", "text_encoder")
        }
        with _quiet_loading():
            self._pipe.load_lora_weights(weights, adapter_name=adapter)
        return expected

    def _misfit(self, adapter: str, expected: dict[str, float]) -> str | None:
        """What did not land: each model's up-projection weights of `adapter` must add up to the file's, or a
        layer kept its initial weights (peft starts them at zero) while the file meant something else."""
        for prefix, model in (("unet", self._pipe.unet), ("text_encoder", self._pipe.text_encoder)):
            landed = sum(
                float(parameter.detach().abs().sum()) for name, parameter in model.named_parameters()
                if name.endswith(f"lora_B.{adapter}.weight")
            )
            if not math.isclose(landed, expected[prefix], rel_tol=1e-2, abs_tol=1e-6):
                return f"its {prefix} weights did not land on the model's layers"
        if not self._has_adapter(adapter):
            return "no layer of the model took it"
        return None

    def _overflows(self, adapter: str) -> bool:
        """Whether a layer of `adapter` adds more than MAX_DELTA (or NaN) to a weight at the highest weight
        a request may give it: peft's delta weight is the product of the LoRA's matrices and its scale."""
        for model in (self._pipe.unet, self._pipe.text_encoder):
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                    largest = module.get_delta_weight(adapter).abs().max() * max(abs(MIN_WEIGHT), MAX_WEIGHT)
                    if not bool(largest <= MAX_DELTA):
                        return True
        return False

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self._cache_size:
                break
            if name not in keep:
                self._drop(name)

    def _drop(self, name: str) -> None:
        entry = self._loaded.pop(name)
        self._remove_adapter(entry.adapter)
        log.info("unloaded LoRA %s", name)

    def _has_adapter(self, adapter: str) -> bool:
        return any(adapter in names for names in self._pipe.get_list_adapters().values())

    def _remove_adapter(self, adapter: str) -> None:
        if self._has_adapter(adapter):
            self._pipe.delete_adapters(adapter)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without what misleads in a server log: a second adapter makes transformers report the text encoder's
    LoRA weights MISSING (they are loaded: `_misfit` checks that they landed), peft warns that a model holds
    several adapters (it is meant to), and a progress bar per load."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def _finite(tensor: torch.Tensor) -> bool:
    # torch has no isfinite for 8-bit floats (an FP8 LoRA): those are widened first, one tensor at a time.
    return bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all())


def _non_finite(name: str) -> InvalidField:
    return InvalidField(
        f"loras: the file of LoRA {name!r} holds non-finite weights (NaN or infinity, or an alpha that scales "
        f"them beyond {MAX_DELTA:g}); replace it in LORA_DIR."
    )

