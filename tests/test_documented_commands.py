"""Every command README.md, docs/DEPLOY.md and .env.example show runs as written, or is checked as far as it can be
here: the README's shell blocks are typed into one shell, in order, in a copy of the repository's files, with a real
server behind the curl lines; its Python blocks run against that server; each `python -m` module, `celery`
subcommand and `make` target named anywhere (code blocks, inline code, .env.example's comments) exists and takes the
options shown. And the reliability figures the README names are those the tests record."""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.settings import REPO_ROOT, Settings
from tests.conftest import API_KEY, LiveServer

DOCUMENTS = ("README.md", "docs/DEPLOY.md", ".env.example")
# What a command may start with, after NAME=value assignments.
PYTHONS = {"python", "python3", ".venv/bin/python"}
CELERYS = {"celery", ".venv/bin/celery"}
# Typed into the shell as written (against the test's server, in the copy of the repository's files).
TYPED = {"cp", "echo", "printf", "export", "curl", "openssl"}
# Run as written, in this process (torch is loaded here already): what writes a file the next lines use.
RUN_HERE = {"stable_diffusion.demo_lora"}
# Not run here, for the reason given; what can be checked of them is.
NOT_RUN = {
    "make": "installs and serves; `make --dry-run` checks the target",
    "redis-server": "a server; make test installs it (scripts/install_redis.sh)",
    "docker": "needs Docker; compose.yaml is checked to exist",
    "pip": "installs packages", ".venv/bin/pip": "installs packages",
    "sd-client": "installed by `pip install .`; pyproject.toml's entry point is checked",
}
# Modules whose --help would start them: `python -m stable_diffusion.gpu_worker` starts a Celery worker whatever
# its arguments (its options are Celery's, checked through `celery -A service.gpu_worker worker --help`).
STARTS_ON_HELP = {"stable_diffusion.gpu_worker"}
INLINE_COMMAND = re.compile(
    r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/\S+|python3?|make|curl|sd-client|celery)\s+\S", re.S
)
# $(...), with parentheses up to two levels deep inside (a python3 -c one-liner's calls).
COMMAND_SUBSTITUTION = re.compile(r"\$\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)")
SERVER_URLS = ("https://localhost:5000", "https://127.0.0.1:5000")


@dataclass(frozen=True)
class Command:
    where: str  # document:line
    text: str  # as written, continuation lines joined
    block: int | None  # the shell block it is in (None: inline code or a comment)

    @property
    def words(self) -> list[str]:
        """Its words without the leading NAME=value assignments (a `$(...)` inside one counts as one word)."""
        words = shlex.split(COMMAND_SUBSTITUTION.sub("SUBSTITUTED", self.text), comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words.pop(0)
        return words

    @property
    def program(self) -> str:
        return self.words[0] if self.words else ""


def code_blocks(document: str) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, text) of each fenced block."""
    text = (REPO_ROOT / document).read_text()
    return [
        (match["language"], text[: match.start()].count("\n") + 1, match["body"])
        for match in re.finditer(r"^```(?P<language>\w*)\n(?P<body>.*?)^```", text, re.S | re.M)
    ]


def block_commands(document: str) -> list[Command]:
    commands = []
    for index, (language, start, body) in enumerate(code_blocks(document)):
        if language not in ("bash", "sh"):
            continue
        joined = re.sub(r"\\\n\s*", "", body)
        for number, line in enumerate(joined.splitlines()):
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(Command(f"{document}:{start + 1 + number}", line.strip(), index))
    return commands


def inline_commands(document: str) -> list[Command]:
    text = (REPO_ROOT / document).read_text()
    outside_blocks = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [
        Command(f"{document} (inline)", " ".join(span.split()), None)
        for span in re.findall(r"`([^`]+)`", outside_blocks)
        if INLINE_COMMAND.match(" ".join(span.split()))
    ]


def env_example_commands() -> list[Command]:
    """The commands .env.example's comments show, indented on a line of their own (`#   command`)."""
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    return [Command(f".env.example:{number}", line[1:].strip(), None)
            for number, line in enumerate(lines, start=1) if line.startswith("#   ")]


def all_commands() -> list[Command]:
    commands = env_example_commands()
    for document in DOCUMENTS[:2]:
        commands += block_commands(document) + inline_commands(document)
    return commands


def test_every_documented_command_is_one_this_test_knows_how_to_check():
    commands = all_commands()
    assert len(commands) > 20
    known = PYTHONS | CELERYS | TYPED | set(NOT_RUN)
    assert [(command.where, command.text) for command in commands if command.program not in known] == []


def module_and_arguments(command: Command) -> tuple[str, list[str]] | None:
    """For `python -m module args...`: the module and its arguments; None for a script (`python app.py`)."""
    words = command.words
    if "-m" in words:
        at = words.index("-m")
        return words[at + 1], words[at + 2:]
    return None


def help_argv(module: str, arguments: list[str]) -> list[str]:
    """The module's --help, of its subcommand when the command names one (`client generate ...`)."""
    subcommand = arguments[:1] if arguments and re.fullmatch(r"[a-z][a-z-]*", arguments[0]) else []
    return [module, *subcommand, "--help"]


def options(arguments: list[str]) -> set[str]:
    return {word.split("=")[0] for word in arguments if word.startswith("--")}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """What a user's copy of the repository holds that the commands read, in a folder the test may write into."""
    folder = tmp_path_factory.mktemp("checkout")
    shutil.copy(REPO_ROOT / ".env.example", folder / ".env.example")
    shutil.copytree(REPO_ROOT / "examples", folder / "examples")
    (folder / "ssl_cert").mkdir()
    return folder


@pytest.fixture(scope="module")
def helped(sandbox) -> dict[tuple[str, ...], dict]:
    """The --help of every module and celery command named, run in one process."""
    runs = []
    for command in all_commands():
        if command.program in CELERYS:
            runs.append({"program": "celery", "argv": [*command.words[1:], "--help"]})
        elif command.program in PYTHONS and (named := module_and_arguments(command)):
            module, arguments = named
            if module not in STARTS_ON_HELP:
                runs.append({"program": "module", "argv": help_argv(module, arguments)})
    unique = [json.loads(text) for text in dict.fromkeys(json.dumps(run) for run in runs)]
    environment = {key: value for key, value in os.environ.items() if key != "API_KEY"}
    environment |= {"PYTHONPATH": str(REPO_ROOT), "SD_ENV_FILE": "", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(
        [sys.executable, "-m", "tests.documented_help"], input=json.dumps(unique), cwd=sandbox, env=environment,
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    return {tuple(run["argv"]): result for run, result in zip(unique, json.loads(finished.stdout), strict=True)}


def test_every_script_make_target_and_file_named_exists():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    targets = set()
    for command in all_commands():
        words = command.words
        if command.program in PYTHONS and module_and_arguments(command) is None and words[1:2] != ["-c"]:
            assert (REPO_ROOT / words[1]).is_file(), command
        elif command.program == "make":
            targets.update(words[1:])
        elif command.program == "cp":
            assert (REPO_ROOT / words[1]).is_file(), command
        elif command.program == "docker":
            assert (REPO_ROOT / "compose.yaml").is_file(), command
        elif command.program == "sd-client":
            assert pyproject["project"]["scripts"]["sd-client"] == "stable_diffusion.client:main"
    made = subprocess.run(["make", "--dry-run", *sorted(targets)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert {"serve", "test", "bench"} <= targets


def run_here(module: str, arguments: list[str], folder: Path) -> None:
    """`python -m module arguments...` in `folder`, in this process."""
    argv, cwd = sys.argv, Path.cwd()
    try:
        os.chdir(folder)
        sys.argv = [module, *arguments]
        with warnings.catch_warnings():
            # Another test imported it already: harmless here, the module only defines functions.
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
        os.chdir(cwd)


class Shell:
    """One shell, as a user types into it: each line runs in bash with the variables the lines before exported."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state = folder / ".shell-state"
        self.state.write_text("")
        self.environment = {key: value for key, value in os.environ.items() if key != "API_KEY"}
        # The snippets import this repository's packages, as they do run from a checkout.
        self.environment["PYTHONPATH"] = str(REPO_ROOT)

    def run(self, line: str) -> subprocess.CompletedProcess:
        script = f"source {shlex.quote(str(self.state))}\n{line}\nexport -p > {shlex.quote(str(self.state))}"
        return subprocess.run(["bash", "-e", "-c", script], cwd=self.folder, env=self.environment,
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def typed_readme(sandbox):
    """The README's shell lines that run here, typed in order into one shell (the demo LoRA command run as
    written, in this process); the server the curl lines reach starts once the quick start has written .env,
    with its key and a LORA_DIR where the demo LoRA command writes."""
    shell, server, outputs, last_id = Shell(sandbox), None, [], None
    try:
        for command in block_commands("README.md"):
            named = module_and_arguments(command) if command.program in PYTHONS else None
            if named and named[0] in RUN_HERE:
                run_here(*named, sandbox)
                continue
            if command.program not in TYPED:
                continue
            line = command.text
            if command.program == "curl":
                if server is None:
                    key = Settings.load(env_file=sandbox / ".env", environ={}).api_keys[0]
                    (sandbox / "server").mkdir()
                    # The test's own key too, which LiveServer waits with.
                    server = LiveServer(sandbox / "server", API_KEY=f"{key},{API_KEY}", RATE_LIMIT_PER_MINUTE="0",
                                        LORA_DIR=str(sandbox / "models" / "lora"))
                    server.wait_until_healthy()
                for url in SERVER_URLS:
                    line = line.replace(url, server.url)
                line = line.replace("<id>", last_id or "<id>")
            result = shell.run(line)
            outputs.append((command, result))
            if result.returncode == 0 and result.stdout.startswith("{"):
                last_id = json.loads(result.stdout).get("id", last_id)
        yield outputs, server, shell
    finally:
        if server is not None:
            server.stop()


def test_the_readmes_shell_lines_run_as_typed_in_one_shell(typed_readme, sandbox):
    outputs, server, _ = typed_readme
    failed = [(command.where, command.text, result.stderr[-500:]) for command, result in outputs if result.returncode]
    assert failed == []
    assert sum(command.program == "curl" for command, _ in outputs) >= 6 and server is not None
    # The quick start's .env: the tiny model, a key of its own; the key curl sent is that one.
    settings = Settings.load(env_file=sandbox / ".env", environ={})
    assert settings.sd_model == "tiny" and len(settings.api_keys[0]) >= 24
    assert (sandbox / "result.png").read_bytes().startswith(b"\x89PNG")
    assert (sandbox / "ssl_cert" / "cert.pem").is_file()


def test_the_readmes_curl_lines_fail_visibly_on_an_error(typed_readme, sandbox):
    _, server, shell = typed_readme
    for command in block_commands("README.md"):
        if command.program != "curl" or "-o result.png" not in command.text:
            continue
        (sandbox / "result.png").unlink(missing_ok=True)
        line = command.text.replace("$API_KEY", "wrong-key").replace("<id>", "0" * 32)
        for url in SERVER_URLS:
            line = line.replace(url, server.url)
        result = shell.run(line)
        assert result.returncode == 22 and "error: 401" in result.stderr, (command.where, result.stderr)
        assert not (sandbox / "result.png").exists(), f"{command.where} saved an error as result.png"


def test_the_readmes_python_blocks_run_against_the_server(typed_readme, sandbox):
    _, server, shell = typed_readme
    blocks = [body for language, _, body in code_blocks("README.md") if language == "python"]
    assert blocks
    for body in blocks:
        code = body.replace("ssl_cert/cert.pem", str(server.cert))
        for url in SERVER_URLS:
            code = code.replace(url, server.url)
        (sandbox / "snippet.py").write_text(code)
        result = shell.run(f"{shlex.quote(sys.executable)} snippet.py")
        assert result.returncode == 0, result.stderr
        # What a person keeps on screen: statuses and steps, never a preview's base64.
        assert "succeeded" in result.stdout and "base64" not in result.stdout and len(result.stdout) < 2000


def recorded_figures() -> tuple[set[str], set[str]]:
    """The figure names the tests record (tests/figures.py): whole names, and the fixed start of computed ones."""
    names, prefixes = set(), set()
    for path in (REPO_ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "record":
                names.update(keyword.arg for keyword in node.keywords if keyword.arg)
            elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "FIGURES":
                if isinstance(node.slice, ast.Constant):
                    names.add(node.slice.value)
                elif isinstance(node.slice, ast.JoinedStr) and isinstance(node.slice.values[0], ast.Constant):
                    prefixes.add(node.slice.values[0].value)
    return names, prefixes


def test_the_reliability_table_names_exactly_the_figures_the_tests_record():
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("## Reliability")[1].split("Also enforced:")[0]
    rows = [line.split(" | ", 1)[1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cited = {name for row in rows for name in re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", row)}
    names, prefixes = recorded_figures()
    assert len(names) > 20
    unknown = {name for name in cited if name not in names and not name.startswith(tuple(prefixes))}
    assert unknown == set(), "the README cites figures no test records"
    uncited = {name for name in names if name not in cited} | {
        prefix for prefix in prefixes if not any(name.startswith(prefix) for name in cited)
    }
    assert uncited == set(), "the tests record figures the README does not name"


# After the typed lines, whose server starts while `helped` runs: the checks of what could not run here.


def test_every_python_module_named_runs_its_help_and_takes_the_options_shown(helped):
    checked = 0
    for command in all_commands():
        named = module_and_arguments(command) if command.program in PYTHONS else None
        if named is None:
            continue
        module, arguments = named
        if module in STARTS_ON_HELP:
            import importlib.util

            assert importlib.util.find_spec(module) is not None, command
            continue
        result = helped[tuple(help_argv(module, arguments))]
        assert result["status"] in (0, None), (command, result)
        missing = [option for option in options(arguments) if option not in result["output"]]
        assert missing == [], f"{command.where}: {command.text}: {missing} not in its --help"
        checked += 1
    assert checked >= 8


def test_every_celery_command_takes_the_options_shown(helped):
    from flower.options import options as flower_options  # Flower's own options are tornado's, not in --help

    commands = [command for command in all_commands() if command.program in CELERYS]
    assert {command.words[3] for command in commands} >= {"worker", "flower"}
    for command in commands:
        result = helped[(*command.words[1:], "--help")]
        assert result["status"] in (0, None), (command, result)
        known = result["output"] + (" ".join(f"--{name}" for name in flower_options.as_dict())
                                    if command.words[3] == "flower" else "")
        missing = [option for option in options(command.words) if option not in known]
        assert missing == [], f"{command.where}: {command.text}: {missing} not in its --help"
