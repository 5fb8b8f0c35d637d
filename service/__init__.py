"""The service layer: what the API does, without HTTP (web/) and without torch (stable_diffusion/)."""
