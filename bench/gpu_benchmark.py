"""The service path against a plain diffusers ControlNet pipeline, full-size SD 1.5 with random weights.

Measured in one run, refinement off and on, 512x512, 20 steps, float16: single-request latency,
images/s at 8 concurrent clients, peak GPU memory, and model FLOPs utilisation (FLOPs per image
counted with torch.utils.flop_counter, over the measured time, against the GPU's dense fp16 peak).
The service path is the worker with dynamic batching; the baseline runs one request at a time.

    python -m bench.gpu_benchmark                                  # on a CUDA/ROCm GPU
    python -m bench.gpu_benchmark --model tiny --device cpu --dtype float32 --resolution 128 --compile off --no-record
                                                                   # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from diffusers import StableDiffusionControlNetImg2ImgPipeline
from torch.utils.flop_counter import FlopCounterMode

from bench.http_overhead import picture, record_entry
from service.fields import generate_fields_model
from service.local import model_config
from service.rendering import build_request
from service.settings import Settings
from service.worker import GenerationWorker
from stable_diffusion.image_processing import DecodeLimits, decode_upload
from stable_diffusion.pipeline_initialization import load_pipelines
from stable_diffusion.pipeline_runner import PipelineRunner

# Dense (no sparsity) fp16/bf16 tensor-core peaks, in FLOP/s.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "MI300X": 1307e12, "MI250": 362e12}
CLIENTS = 8
REFINE_STRENGTHS = (0.0, 0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5, help="timed single requests per path")
    parser.add_argument("--per-client", type=int, default=3, help="requests each of the 8 clients sends")
    parser.add_argument("--compile", default="default", help="TORCH_COMPILE for the service path (off: eager)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense fp16 peak, if not in the table")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    environment = {"API_KEY": "bench", "SD_MODEL": args.model, "DEVICE": args.device, "DTYPE": args.dtype,
                   "MAX_RESOLUTION": str(max(args.resolution, 64)), "DEFAULT_RESOLUTION": str(args.resolution)}
    settings = Settings.load(env_file=None, environ=environment | {"TORCH_COMPILE": args.compile})
    requests = {refine: _request(settings, args, refine) for refine in REFINE_STRENGTHS}

    # One path loaded at a time, so that each one's peak memory is its own.
    described, served = _measure_service(settings, requests, args)
    _free_memory()
    plain, flops = _measure_plain(environment, requests, args)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else _peak_flops()

    rows = []
    for refine in REFINE_STRENGTHS:
        for path, (latency, rate, memory) in (
            (f"service (batching, compile {args.compile})", served[refine]),
            ("plain diffusers, one at a time", plain[refine]),
        ):
            mfu = f"{flops[refine] * rate / peak:.1%}" if peak else "n/a"
            rows.append(
                f"| {path} | {refine:g} | {latency:.3f} | {rate:.2f} | {memory} | {flops[refine] / 1e12:.3f} | {mfu} |"
            )
        speed_up = served[refine][1] / plain[refine][1]
        rows.append(f"| speed-up at {CLIENTS} clients | {refine:g} | | {speed_up:.2f}x | | | |")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else args.device
    table = "\n".join([
        "| path | refine | latency s | images/s at 8 clients | peak memory | TFLOPs per image | MFU |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    warm_up = described["warm_up_seconds"]
    width, height = requests[0.0].size
    print(f"device: {device}; {width}x{height}, {args.steps} steps; "
          f"service warm-up (compilation included): {warm_up} s\n{table}")
    if not args.no_record:
        work = (f"{args.model}, {width}x{height}, {args.steps} steps, {args.dtype} on {device}; "
                f"service: {described}; "
                f"latency: median of {args.runs} single requests; images/s: {CLIENTS} clients x {args.per_client}")
        command = "python -m bench.gpu_benchmark " + " ".join(sys.argv[1:])
        record_entry(f"Service against plain diffusers, {device}", command.strip(), work, table)


def _measure_service(settings: Settings, requests: dict, args) -> tuple[dict, dict]:
    """The worker with dynamic batching, warmed up (and compiled) as the server does before /ready."""
    # Loaded on the worker thread, as the server does, so all torch work happens on one thread.
    worker = GenerationWorker(
        lambda: PipelineRunner(load_pipelines(model_config(settings)), max_batch=CLIENTS,
                                warm_up_sizes=((args.resolution,) * 2,)),
        queue_size=64, max_batch=CLIENTS, batch_wait_s=0.01,
    )
    if not worker.wait_until_loaded():
        raise SystemExit(f"the service path failed to load: {worker.load_error!r}")
    try:
        return worker.runner.describe(), {
            refine: _measure(lambda request=request: worker.submit(request).result(), args.runs, args.per_client)
            for refine, request in requests.items()
        }
    finally:
        worker.close()


def _measure_plain(environment: dict, requests: dict, args) -> tuple[dict, dict]:
    """What a plain script loads and does: float16, diffusers' defaults, no hooks, one request at a time;
    and the FLOPs per image, counted on this path."""
    settings = Settings.load(env_file=None, environ=environment | {"CHANNELS_LAST": "off"})
    baseline = load_pipelines(model_config(settings))
    measured = {}
    for refine, request in requests.items():
        with _one_at_a_time(_plain_call(baseline, request)) as call:
            measured[refine] = _measure(call, args.runs, args.per_client)
    return measured, {refine: _flops_per_image(baseline, request) for refine, request in requests.items()}


@contextmanager
def _one_at_a_time(call):
    """A plain script serves one request at a time, on one thread (as the service's worker does):
    concurrent clients wait their turn."""
    with ThreadPoolExecutor(1) as runner:
        yield lambda: runner.submit(call).result()


def _request(settings: Settings, args, refine: float):
    fields = generate_fields_model(settings).model_validate(
        {"prompt": "a lighthouse", "resolution": str(args.resolution), "steps": str(args.steps),
         "seed": "1", "refine_strength": str(refine)}
    )
    return build_request("bench", fields, decode_upload(picture(256, 256), DecodeLimits(10**8, 1)))


def _plain_call(pipelines, request):
    """What a plain diffusers script does per request: the pipeline call(s), nothing else."""
    refine = StableDiffusionControlNetImg2ImgPipeline.from_pipe(pipelines.generate)
    refine.set_progress_bar_config(disable=True)
    width, height = request.size

    def call():
        arguments = {"prompt": request.prompt, "num_inference_steps": request.steps,
                     "guidance_scale": request.guidance_scale,
                     "generator": torch.Generator("cpu").manual_seed(request.seed)}
        image = pipelines.generate(image=request.control_images[0], width=width, height=height, **arguments).images
        if request.refine_steps:
            refine(image=image, control_image=request.control_images[0], strength=request.refine_strength,
                   **arguments)

    return call


def _flops_per_image(pipelines, request) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        _plain_call(pipelines, request)()
    return counter.get_total_flops()


def _measure(call, runs: int, per_client: int) -> tuple[float, float, str]:
    call()  # warm-up
    _reset_memory()
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        _synchronize()
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda _: [call() for _ in range(per_client)], range(CLIENTS)))
    _synchronize()
    rate = CLIENTS * per_client / (time.perf_counter() - started)
    return statistics.median(latencies), rate, _peak_memory()


def _reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory() -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "n/a"


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


if __name__ == "__main__":
    main()
