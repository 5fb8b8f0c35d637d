"""A client for the API: a small Python class for scripts, and a command line on top of it.

    python -m stable_diffusion.client generate examples/lighthouse.png "a lighthouse at dusk" -o out.png --insecure
    sd-client generate examples/lighthouse.png "a lighthouse at dusk" -o out.png --insecure  # after `pip install .`

It submits a job, follows its event stream with a progress bar, and saves the result. The server's
address and key come from --url/--key, or SD_API_URL and SD_API_KEY (or API_KEY, the server's name for it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import requests
import sseclient
import urllib3
from tqdm import tqdm

DEFAULT_URL = "https://127.0.0.1:5000"
FINISHED = ("succeeded", "failed", "canceled")


class ApiError(Exception):
    """The server answered with an error: `status` is the HTTP status, `message` its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class Client:
    """`verify` is passed to requests: True, False (self-signed, unchecked) or a CA/certificate path."""

    def __init__(self, url: str, key: str, *, verify: bool | str = True, timeout: float = 60) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        self.session.headers["x-api-key"] = key
        # Passed with every call: a Session's own `verify` loses to REQUESTS_CA_BUNDLE in the environment.
        self.verify = verify

    def submit(self, image: str | Path | bytes, prompt: str, **fields: object) -> dict:
        """Queue a job; `fields` are /generate's optional fields (negative_prompt, sensitivity, seed, ...)."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        form = {"prompt": prompt} | {name: _form_value(value) for name, value in fields.items() if value is not None}
        return self._call("POST", "/jobs", files={"image": ("image", data)}, data=form).json()

    def models(self) -> dict:
        """The base model, the ControlNet and the LoRAs a request may name (GET /models)."""
        return self._call("GET", "/models").json()

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        return self._call("DELETE", f"/jobs/{job_id}").json()

    def result(self, job_id: str) -> bytes:
        return self._call("GET", f"/jobs/{job_id}/result").content

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(kind, data) for every event until the job ends: status, progress and preview."""
        response = self._call("GET", f"/jobs/{job_id}/events", stream=True, timeout=(self.timeout, None))
        with response:
            for event in sseclient.SSEClient(response).events():
                yield event.event, json.loads(event.data)

    def generate(
        self,
        image: str | Path | bytes,
        prompt: str,
        on_event: Callable[[str, dict], None] | None = None,
        **fields: object,
    ) -> tuple[dict, bytes]:
        """Submit, follow until the job ends, and return (final status, picture); ApiError if it did not succeed."""
        return self.follow(self.submit(image, prompt, **fields), on_event)

    def follow(self, job: dict, on_event: Callable[[str, dict], None] | None = None) -> tuple[dict, bytes]:
        """Follow a submitted job's events until it ends; (final status, picture), or ApiError if it failed."""
        for kind, data in self.events(job["id"]):
            if on_event is not None:
                on_event(kind, data)
            if kind == "status":
                job = data
        if job["status"] not in FINISHED:
            job = self.status(job["id"])
        if job["status"] != "succeeded":
            raise ApiError(409, job.get("error") or f"The job was {job['status']}.")
        return job, self.result(job["id"])

    def _call(self, method: str, path: str, **options) -> requests.Response:
        options.setdefault("timeout", self.timeout)
        options.setdefault("verify", self.verify)
        response = self.session.request(method, f"{self.url}{path}", **options)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200] or response.reason
            raise ApiError(response.status_code, message)
        return response


def _form_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.key:
        print("error: no API key: pass --key, or set SD_API_KEY (or API_KEY, as the server's .env names it)",
              file=sys.stderr)
        return 2
    if args.insecure:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    client = Client(args.url, args.key, verify=False if args.insecure else (args.ca_cert or True))
    if args.command == "models":
        return _print_models(client, args.ca_cert)
    fields = {
        "negative_prompt": args.negative,
        "sensitivity": args.sensitivity,
        "seed": args.seed,
        "steps": args.steps,
        "resolution": args.resolution,
        "loras": ",".join(args.lora) if args.lora else None,
    }
    try:
        job = client.submit(args.image, args.prompt, **fields)
        # Drawn only once the server took the job, so that an error is the only thing printed.
        with tqdm(total=1, unit="step", disable=args.quiet, desc=job["status"]) as bar:
            job, picture = client.follow(job, on_event=partial(_show_progress, bar))
    except requests.exceptions.SSLError as exc:
        print(_certificate_advice(exc, args.ca_cert), file=sys.stderr)
        return 1
    except requests.ConnectionError:
        print(_unreachable(args.url), file=sys.stderr)
        return 1
    except (ApiError, requests.RequestException, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extension = ".gif" if job.get("result_type") == "image/gif" else ".png"
    output = args.output or Path(f"{job['id']}{extension}")
    output.write_bytes(picture)
    print(f"saved {output} (job {job['id']}, seed {job['seed']})")
    return 0


def _print_models(client: Client, ca_cert: str | None) -> int:
    try:
        models = client.models()
    except requests.exceptions.SSLError as exc:
        print(_certificate_advice(exc, ca_cert), file=sys.stderr)
        return 1
    except requests.ConnectionError:
        print(_unreachable(client.url), file=sys.stderr)
        return 1
    except (ApiError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for role in ("sd_model", "controlnet_model"):
        model = models[role] or {"name": "(loading)", "size_bytes": None}
        print(f"{role}: {model['name']}" + (_file_facts(model) if model["size_bytes"] is not None else ""))
    for lora in models["loras"]:
        print(f"lora: {lora['name']}{_file_facts(lora)}")
    if not models["loras"]:
        print("no LoRAs (the server's LORA_DIR is empty)")
    return 0


def _file_facts(entry: dict) -> str:
    """Size and hash; the server hashes files in the background, and says null until it has."""
    return f" ({entry['size_bytes']} bytes, sha256 {entry['sha256'] or 'not computed yet'})"


def _show_progress(bar: tqdm, kind: str, data: dict) -> None:
    if kind == "status":
        bar.set_description(data["status"])
    if kind in ("status", "progress"):
        progress = data["progress"] if kind == "status" else data
        bar.total = max(progress["total"], 1)
        bar.n = progress["step"]
        bar.refresh()


def _certificate_advice(exc: requests.exceptions.SSLError, ca_cert: str | None) -> str:
    """What to do when the server's certificate is not trusted (by default, it is self-signed)."""
    reason = re.search(r"certificate verify failed: ([^(']+)", str(exc))
    why = f" ({reason.group(1).strip()})" if reason else ""
    if ca_cert:
        return (
            f"error: the server's certificate does not match {ca_cert}{why}: pass the server's own certificate, "
            "its ssl_cert/cert.pem (TLS_CERT_FILE), or --insecure instead of --ca-cert to accept any."
        )
    return (
        f"error: the server's certificate is not trusted{why}. The server makes a self-signed one on first start: "
        "pass --ca-cert ssl_cert/cert.pem (that file from the server, its TLS_CERT_FILE) to trust exactly it, "
        "or --insecure to accept any certificate."
    )


def _unreachable(url: str) -> str:
    return f"error: nothing answers at {url}: is the server running there? Pass --url or set SD_API_URL."


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url", default=os.environ.get("SD_API_URL", DEFAULT_URL), help=f"default: $SD_API_URL, else {DEFAULT_URL}"
    )
    connection.add_argument(
        "--key", default=os.environ.get("SD_API_KEY") or os.environ.get("API_KEY"),
        help="default: $SD_API_KEY, else $API_KEY",
    )
    trust = connection.add_mutually_exclusive_group()
    trust.add_argument("--insecure", action="store_true", help="accept any certificate (the self-signed one)")
    trust.add_argument("--ca-cert", help="trust this certificate file, e.g. the server's ssl_cert/cert.pem")
    connection.add_argument("--quiet", action="store_true", help="no progress bar")

    # The usage line names the command as typed: the installed `sd-client` script or the module.
    program = "sd-client" if Path(sys.argv[0]).name == "sd-client" else "python -m stable_diffusion.client"
    parser = argparse.ArgumentParser(prog=program, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", parents=[connection], help="generate a picture from IMAGE's edges and PROMPT"
    )
    generate.add_argument("image", type=Path)
    generate.add_argument("prompt")
    generate.add_argument("--negative", help="negative prompt")
    generate.add_argument("--sensitivity", type=float, help="ControlNet conditioning scale, 0 to 2")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--resolution", type=int)
    generate.add_argument(
        "--lora", action="append", metavar="NAME:WEIGHT",
        help="apply a LoRA of the server (weight -2 to 2, default 1); repeat for more; see the models command",
    )
    generate.add_argument("-o", "--output", type=Path, help="default: <job id>.png")
    commands.add_parser("models", parents=[connection], help="list the server's model, ControlNet and LoRAs")
    return parser


if __name__ == "__main__":
    sys.exit(main())
