"""Images per second through the live HTTPS server at 1, 4 and 8 concurrent clients, batching off
(BATCH_SIZE=1) and on (BATCH_SIZE=8). Tiny model on the CPU; prints a table and appends it, with the
date, machine and command, to docs/BENCHMARKS.md.

    python -m bench.throughput [--requests-per-client 3] [--resolution 256] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import requests

from bench.http_overhead import KEY, free_port, live_server, picture, record_entry, server_environment

CLIENTS = (1, 4, 8)
BATCH_SIZES = (1, 8)


def images_per_second(
    url: str, cert: str, clients: int, per_client: int, fields: dict, upload: bytes, key: str = KEY
) -> float:
    def client(_) -> None:
        with requests.Session() as session:
            for _ in range(per_client):
                response = session.post(
                    f"{url}/generate", headers={"x-api-key": key}, files={"image": ("p.png", upload)},
                    data=fields, verify=cert, timeout=600,
                )
                response.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return clients * per_client / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements per cell; the median")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    fields = {"prompt": "a lighthouse", "resolution": str(args.resolution), "steps": str(args.steps)}
    upload = picture()

    # Both servers run side by side and are measured in turn, so that drift in this machine's speed
    # falls on both alike (one idles while the other works).
    with tempfile.TemporaryDirectory() as folder, ExitStack() as servers:
        urls, certs = {}, {}
        for batch_size in BATCH_SIZES:
            port = free_port()
            environment = server_environment(
                f"{folder}/{batch_size}", port, BATCH_SIZE=str(batch_size), BATCH_WAIT_MS="20",
                RATE_LIMIT_PER_MINUTE="0", MAX_QUEUED_PER_KEY="100",
            )
            urls[batch_size] = servers.enter_context(live_server(environment, port))
            certs[batch_size] = environment["TLS_CERT_FILE"]
            images_per_second(urls[batch_size], certs[batch_size], 1, 1, fields, upload)  # warm-up
        measured = {(size, clients): [] for size in BATCH_SIZES for clients in CLIENTS}
        for _ in range(args.rounds):
            for clients in CLIENTS:
                for size in BATCH_SIZES:
                    measured[size, clients].append(
                        images_per_second(urls[size], certs[size], clients, args.requests_per_client, fields, upload)
                    )
    table = "\n".join(
        [
            "| batching | " + " | ".join(f"{clients} clients, images/s" for clients in CLIENTS) + " |",
            "|---|" + "---|" * len(CLIENTS),
            *(
                f"| {'off (BATCH_SIZE=1)' if size == 1 else f'on (BATCH_SIZE={size})'} | "
                + " | ".join(f"{statistics.median(measured[size, clients]):.3f}" for clients in CLIENTS) + " |"
                for size in BATCH_SIZES
            ),
        ]
    )
    print(table)
    if not args.no_record:
        command = (
            f"python -m bench.throughput --requests-per-client {args.requests_per_client} "
            f"--resolution {args.resolution} --steps {args.steps} --rounds {args.rounds}"
        )
        work = (
            f"384x256 PNG upload, resolution {args.resolution}, {args.steps} steps, refinement 0.3; each client "
            f"sends {args.requests_per_client} requests one after another, after one warm-up request; both "
            f"servers up at once and measured in turn, median of {args.rounds} rounds"
        )
        record_entry("Throughput through the HTTPS server, tiny model on CPU", command, work, table)


if __name__ == "__main__":
    main()
