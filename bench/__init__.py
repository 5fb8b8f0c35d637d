"""The benchmarks, run from the repository root as modules (`python -m bench.benchmark --mode cpu`), so that
`stable_diffusion` imports from the checkout (or an editable install) without touching `sys.path`."""
