"""LoRAs on the loaded pipelines: each file of LORA_DIR becomes a peft adapter of the UNet and text encoder
(shared by the generate and refine pipelines), loaded on first use and kept for the next requests, at most
LORA_CACHE of them (the least recently used is dropped). A batch runs with exactly its LoRA set active, or
with the adapters switched off, so that a request without LoRAs gets the base model's pictures."""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from diffusers import StableDiffusionControlNetPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from stable_diffusion.errors import InvalidField
from stable_diffusion.lora_library import LoraFile, LoraLibrary, LoraSet
from stable_diffusion.recipe import AppliedLora

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    adapter: str
    file: LoraFile


class LoraAdapters:
    def __init__(self, pipe: StableDiffusionControlNetPipeline, library: LoraLibrary, cache_size: int) -> None:
        self._pipe, self._library, self._cache_size = pipe, library, cache_size
        # By name, least recently used first.
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._serial = 0

    def activate(self, loras: LoraSet) -> tuple[AppliedLora, ...]:
        """Make `loras` the active set (none: adapters off); InvalidField for a file that is missing, is no
        LoRA, or does not fit the model."""
        if not loras:
            if self._loaded:
                self._pipe.disable_lora()
            return ()
        loaded = [self._load(name, keep={name for name, _ in loras}) for name, _ in loras]
        self._pipe.enable_lora()
        self._pipe.set_adapters([entry.adapter for entry in loaded], [weight for _, weight in loras])
        return tuple(
            AppliedLora(name, weight, entry.file.short_hash)
            for (name, weight), entry in zip(loras, loaded, strict=True)
        )

    def _load(self, name: str, keep: set[str]) -> _Loaded:
        file = self._library.file(name)
        entry = self._loaded.get(name)
        if entry is not None and entry.file == file:
            self._loaded.move_to_end(name)
            return entry
        if entry is not None:  # the file changed since it was loaded
            self._drop(name)
        started = time.perf_counter()
        try:
            weights = load_file(file.path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidField(
                f"loras: the file of LoRA {name!r} is not a readable .safetensors file ({_first_line(exc)}); "
                "replace it in LORA_DIR."
            ) from None
        # peft names adapters as module attributes: no dots, so a serial number rather than the file's name.
        self._serial += 1
        adapter = f"lora_{self._serial}"
        try:
            expected = self._add_adapter(weights, adapter)
        except Exception as exc:  # diffusers and peft raise ValueError, KeyError, RuntimeError... for a misfit
            self._remove_adapter(adapter)
            raise InvalidField(
                f"loras: LoRA {name!r} does not fit the loaded model ({type(exc).__name__}: {_first_line(exc)}); "
                "it may be made for another architecture (this service runs SD 1.5)."
            ) from None
        found = self._adapter_weights(adapter)
        if found != expected:
            # peft would give layers without weights in the file new random ones: never paint with those.
            self._remove_adapter(adapter)
            raise InvalidField(
                f"loras: LoRA {name!r} does not fit the loaded model: {expected} of its weights should land on "
                f"{found} places; it may be made for another architecture (this service runs SD 1.5)."
            )
        entry = self._loaded[name] = _Loaded(adapter, file)
        log.info("loaded LoRA %s (%d bytes) in %.2f s", name, file.size, time.perf_counter() - started)
        self._evict(keep)
        return entry

    def _add_adapter(self, weights: dict, adapter: str) -> int:
        """What load_lora_weights does, with the text encoder's names mended: the file (kohya, or diffusers'
        own layout) names its layers `text_model.…`, which transformers 5.6 and later no longer nest the CLIP
        text model under, and peft would fill such layers with random weights. Returns the LoRA weights the
        file holds."""
        pipe = self._pipe
        state_dict, alphas, metadata = pipe.lora_state_dict(weights, return_lora_metadata=True)
        if not hasattr(pipe.text_encoder, "text_model"):
            def flat(key: str) -> str:
                return key.replace("text_encoder.text_model.", "text_encoder.", 1)

            state_dict = {flat(key): value for key, value in state_dict.items()}
            alphas = {flat(key): value for key, value in alphas.items()} if alphas else alphas
        with _quiet_loading():
            pipe.load_lora_into_unet(state_dict, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter,
                                     metadata=metadata, _pipeline=pipe)
            pipe.load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=pipe.text_encoder,
                                             lora_scale=pipe.lora_scale, adapter_name=adapter, metadata=metadata,
                                             _pipeline=pipe)
        return sum(".lora_A." in key or ".lora_B." in key or "lora.down" in key or "lora.up" in key
                   for key in state_dict)

    def _adapter_weights(self, adapter: str) -> int:
        """The LoRA weights of `adapter` in the UNet and text encoder."""
        return sum(
            name.endswith((f"lora_A.{adapter}.weight", f"lora_B.{adapter}.weight"))
            for model in (self._pipe.unet, self._pipe.text_encoder)
            for name, _ in model.named_parameters()
        )

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
    LoRA weights MISSING (they are loaded: `_adapter_weights` counts them, and tests compare them), peft warns
    that a model holds several adapters (it is meant to), and a progress bar per load."""
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
