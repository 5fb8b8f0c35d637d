"""What a LoRA costs a request: the same request without a LoRA, with one loaded LoRA, with two, and with a
LoRA loaded for it (LORA_CACHE=1, two LoRAs taken in turn, so each request loads its own), measured in turn in
one run on the tiny model on the CPU; and what loading took against reading the file. Prints a table and
appends it, with the date, machine and command, to docs/BENCHMARKS.md.

    python -m bench.lora_cost [--resolution 256] [--steps 20] [--rounds 5] [--rank 16]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image
from safetensors.torch import load

from bench.http_overhead import record_entry
from stable_diffusion.config import ModelConfig
from stable_diffusion.file_reading import read_whole
from stable_diffusion.lora_library import MAX_LORA_BYTES
from stable_diffusion.pipeline_initialization import build_tiny_pipeline, load_pipelines
from stable_diffusion.pipeline_runner import PipelineRunner
from stable_diffusion.recipe import GenerationRequest
from tests.model_files import write_kohya_lora

VARIANTS = {
    "no LoRA": (),
    "one LoRA (loaded before)": (("ink", 0.8),),
    "two LoRAs (loaded before)": (("ink", 0.8), ("paper", 0.5)),
}


class LoadTimes(logging.Handler):
    """The load times the service logs ("loaded LoRA <name> (<size> bytes) in <s> s")."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"in ([0-9.]+) s$", record.getMessage())
        if found:
            self.seconds.append(float(found.group(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="measurements of each variant, in turn; the median")
    parser.add_argument("--rank", type=int, default=16, help="the LoRAs' rank")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    load_times = LoadTimes()
    logging.getLogger("stable_diffusion.loras").addHandler(load_times)
    logging.getLogger("stable_diffusion.loras").setLevel(logging.INFO)

    with tempfile.TemporaryDirectory() as folder:
        loras = Path(folder)
        source = build_tiny_pipeline()
        for seed, name in enumerate(("ink", "paper")):
            write_kohya_lora(source.unet, source.text_encoder, loras / f"{name}.safetensors", rank=args.rank, seed=seed)
        config = ModelConfig("tiny", "tiny", device="cpu", lora_dir=loras)
        cached = PipelineRunner(load_pipelines(config))
        one_cached = ModelConfig("tiny", "tiny", device="cpu", lora_dir=loras, lora_cache=1)
        switching = PipelineRunner(load_pipelines(one_cached))
        edges = Image.new("RGB", (args.resolution, args.resolution))
        edges.paste((255, 255, 255), (args.resolution // 4,) * 2 + (3 * args.resolution // 4,) * 2)

        def seconds(generator: PipelineRunner, loras: tuple) -> float:
            request = GenerationRequest("bench", (edges,), "a lighthouse", seed=1, steps=args.steps, loras=loras)
            started = time.perf_counter()
            generator.run(request)
            return time.perf_counter() - started

        for loras_of_variant in VARIANTS.values():
            seconds(cached, loras_of_variant)  # first runs: kernels chosen, LoRAs loaded
        seconds(switching, (("ink", 0.8),))
        load_times.seconds.clear()
        times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "one LoRA, loaded for the request"]}
        for round_ in range(args.rounds):
            for name, loras_of_variant in VARIANTS.items():
                times[name].append(seconds(cached, loras_of_variant))
            other = ("paper", "ink")[round_ % 2]
            times["one LoRA, loaded for the request"].append(seconds(switching, ((other, 0.8),)))
        reads = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            load(read_whole(loras / "ink.safetensors", MAX_LORA_BYTES)[0])  # as the service reads a LoRA
            reads.append(time.perf_counter() - started)
        size = (loras / "ink.safetensors").stat().st_size

    base = statistics.median(times["no LoRA"])
    rows = [
        f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / base:.2f}x |"
        for name, values in times.items()
    ]
    table = "\n".join(["| request | seconds (median) | against no LoRA |", "|---|---|---|", *rows])
    loading = (
        f"Loading a LoRA ({size / 1e6:.1f} MB, rank {args.rank}): {statistics.median(load_times.seconds):.3f} s "
        f"(median of {len(load_times.seconds)}; the service's own log line), of which reading the file "
        f"{statistics.median(reads):.4f} s; the rest is diffusers' and peft's adapter set-up."
    )
    print(table)
    print(loading)
    if not args.no_record:
        command = "python -m bench.lora_cost " + " ".join(
            f"--{name} {getattr(args, name)}" for name in ("resolution", "steps", "rounds", "rank")
        )
        work = (
            f"tiny model, {args.resolution} px square, {args.steps} steps with refinement, one picture per request, "
            "in process (the HTTP path is the same with or without a LoRA); variants measured in turn"
        )
        record_entry("What a LoRA costs a request, tiny model on CPU", command, work, f"{table}\n\n{loading}")


if __name__ == "__main__":
    main()
