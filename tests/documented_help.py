"""Runs documented command lines in this one process, each as its `python -m` or `celery` entry point would run it,
and prints what each did as JSON: a process of its own per command would import torch again and again.

Reads a JSON list of {"program": "module" | "celery", "argv": [...]} from stdin; `argv` is run as given
(tests/test_documented_commands.py appends --help where a command is only to be checked).
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys


def run(program: str, argv: list[str]) -> dict:
    output = io.StringIO()
    status: object = 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            if program == "module":
                sys.argv = list(argv)
                runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
            else:
                from celery.bin.celery import celery

                celery.main(args=argv, prog_name="celery")
        except SystemExit as exit:
            status = exit.code
        except Exception as exc:  # a command that fails as a user would see it fail
            status = f"{type(exc).__name__}: {exc}"
    return {"status": status if status is None or isinstance(status, int) else str(status), "output": output.getvalue()}


def main() -> None:
    commands = json.load(sys.stdin)
    results = [run(command["program"], command["argv"]) for command in commands]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
