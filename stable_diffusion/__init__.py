"""Stable Diffusion + ControlNet (Canny) image generation: everything but the HTTP layer."""

from stable_diffusion.library_noise import quiet_library_noise

# Before any submodule imports diffusers or transformers, which say some of it while being imported.
quiet_library_noise()
