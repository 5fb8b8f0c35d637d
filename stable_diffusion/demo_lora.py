"""The demo LoRA command: writes a LoRA with random weights for the built-in tiny model into LORA_DIR, to try LoRAs
without downloading anything (real SD 1.5 LoRAs do not fit the tiny model). The writing is kohya_lora.py's; torch
is imported only once there is something to write, so --help answers at once.

    python -m stable_diffusion.demo_lora [FOLDER] [--name demo]   # FOLDER: LORA_DIR, models/lora by default
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_FOLDER = Path("models/lora")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stable_diffusion.demo_lora",
        description="Write a LoRA with random weights for the built-in tiny model (SD_MODEL=tiny), to try the "
        "loras field, <lora:name:weight> tags and the page's LoRA picker without downloading anything.",
    )
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
                        help="the server's LORA_DIR (default: %(default)s)")
    parser.add_argument("--name", default="demo", help="the LoRA's name in requests (default: %(default)s)")
    arguments = parser.parse_args(argv)

    from stable_diffusion.kohya_lora import write_demo_lora

    path = write_demo_lora(arguments.folder, arguments.name)
    print(f"wrote {path}: request it with loras={arguments.name}:1 or <lora:{arguments.name}:1> in the prompt "
          "(on a server with SD_MODEL=tiny)")


if __name__ == "__main__":
    main()
