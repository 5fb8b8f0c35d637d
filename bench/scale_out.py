"""Images per second with one GPU worker and with two (QUEUE_BACKEND=celery), at 8 concurrent clients, in
one run: a real redis-server, GPU worker processes limited to one CPU thread each (OMP_NUM_THREADS=1) and a
gunicorn web tier of two processes, all on the tiny model. Prints a table and appends it, with the date,
machine and command, to docs/BENCHMARKS.md.

    python -m bench.scale_out [--clients 8] [--requests-per-client 3] [--resolution 256] [--steps 20]
                              [--batch-size 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import Counter
from pathlib import Path

from bench.http_overhead import picture, record_entry
from bench.throughput import images_per_second
from tests.conftest import API_KEY, LiveServer
from tests.processes import GpuWorker, RedisServer

REDIS_FIGURES = ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="BATCH_SIZE of each GPU worker")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements per cell; the median")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    fields = {"prompt": "a lighthouse", "resolution": str(args.resolution), "steps": str(args.steps)}
    upload = picture()

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        broker = RedisServer(folder)
        settings = {
            "QUEUE_BACKEND": "celery", "REDIS_URL": broker.url, "WEB_WORKERS": "2", "RATE_LIMIT_PER_MINUTE": "0",
            "MAX_QUEUED_PER_KEY": "100", "QUEUE_SIZE": "100", "GENERATION_TIMEOUT_S": "900",
        }
        # Each worker warms up at the measured size, with one CPU thread (a GPU's share of this machine).
        worker_settings = settings | {
            "OMP_NUM_THREADS": "1", "BATCH_SIZE": str(args.batch_size), "BATCH_WAIT_MS": "20",
            "DEFAULT_RESOLUTION": str(args.resolution),
        }
        first = GpuWorker(folder, "first", **worker_settings)
        web = LiveServer(folder, **settings)
        try:
            first.wait_until_ready(broker.client())
            web.wait_until_healthy()
            url, cert = web.url, str(web.cert)

            def measure() -> float:
                return images_per_second(url, cert, args.clients, args.requests_per_client, fields, upload, API_KEY)

            def redis_totals() -> Counter:
                stats = broker.client().info("stats")
                return Counter({key: stats[key] for key in REDIS_FIGURES})

            images_per_second(url, cert, 2, 1, fields, upload, API_KEY)  # warm-up
            measured: dict[int, list[float]] = {1: [], 2: []}
            traffic: Counter = Counter()
            for round_number in range(args.rounds):
                before = redis_totals()
                measured[1].append(measure())
                traffic += redis_totals() - before
                second = GpuWorker(folder, f"second-{round_number}", **worker_settings)
                try:
                    second.wait_until_ready(broker.client())
                    measured[2].append(measure())
                finally:
                    second.stop()
                print(f"round {round_number + 1}: one worker {measured[1][-1]:.3f}, two {measured[2][-1]:.3f} images/s")
        finally:
            web.stop()
            first.stop()
            broker.stop()

    one, two = statistics.median(measured[1]), statistics.median(measured[2])
    requests_made = args.rounds * args.clients * args.requests_per_client
    per_request = {key: value / requests_made for key, value in traffic.items()}
    table = "\n".join([
        f"| GPU workers | {args.clients} clients, images/s |",
        "|---|---|",
        f"| 1 | {one:.3f} |",
        f"| 2 | {two:.3f} |",
        "",
        f"Two workers against one: **{two / one:.2f}x** (target: at least 1.7x)",
        "",
        f"Redis per request (one-worker rounds, heartbeats included): {per_request['total_commands_processed']:.0f} "
        f"commands, {per_request['total_net_input_bytes'] / 1024:.0f} KiB in, "
        f"{per_request['total_net_output_bytes'] / 1024:.0f} KiB out",
    ])
    print(table)
    if not args.no_record:
        command = (
            f"python -m bench.scale_out --clients {args.clients} --requests-per-client {args.requests_per_client} "
            f"--resolution {args.resolution} --steps {args.steps} --batch-size {args.batch_size} "
            f"--rounds {args.rounds}"
        )
        work = (
            f"QUEUE_BACKEND=celery: redis-server, gunicorn with WEB_WORKERS=2, GPU workers with OMP_NUM_THREADS=1 "
            f"and BATCH_SIZE={args.batch_size}; 384x256 PNG upload, resolution {args.resolution}, {args.steps} "
            f"steps, refinement 0.3; {args.clients} clients each send {args.requests_per_client} requests one "
            f"after another; one worker, then a second started beside it, in turn, median of {args.rounds} rounds"
        )
        record_entry("Scale-out: one GPU worker against two, tiny model on CPU", command, work, table)


if __name__ == "__main__":
    main()
