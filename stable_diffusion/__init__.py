"""Stable Diffusion + ControlNet (Canny) image generation: everything but the HTTP layer."""
