"""The service's configuration: one validated object, read once from `.env` and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.api_keys import entry_digest

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ENV_FILE = REPO_ROOT / ".env"
# Names another settings file; empty: read none (the tests' servers never read a user's .env).
ENV_FILE_VARIABLE = "SD_ENV_FILE"
# Old names no longer read, because other software reads them with another meaning.
RENAMED_SETTINGS = {"SSL_CERT_FILE": "TLS_CERT_FILE", "SSL_KEY_FILE": "TLS_KEY_FILE"}

# Never echoed in messages: keys, and a Redis URL that may carry a password.
SECRET_SETTINGS = ("API_KEY", "REDIS_URL")

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CANNY_CONTROLNET_ID = "lllyasviel/sd-controlnet-canny"


class SettingsError(Exception):
    """A setting is missing or invalid; the message names it and says how to fix it."""


class Settings(BaseSettings):
    """Every setting of the service. Field aliases are the environment variable names."""

    # Names match in their exact case. Defaults are not validated, as before: BaseSettings' validate_default
    # would newly refuse DEFAULT_RESOLUTION=2048 with MAX_RESOLUTION left at its 1024.
    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", populate_by_name=True, case_sensitive=True, validate_default=False
    )

    # NoDecode: lists are comma-separated, not JSON.
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(alias="API_KEY", repr=False, min_length=1)
    # `::` listens on every IPv6 and IPv4 address (0.0.0.0 where the machine has no IPv6).
    server_ip: str = Field("::", alias="SERVER_IP")
    server_port: int = Field(5000, alias="SERVER_PORT", ge=0, le=65535)
    tls: bool = Field(True, alias="TLS")
    # Not SSL_CERT_FILE: OpenSSL, Python's ssl, curl and pip read that one as the trusted CA bundle.
    tls_cert_file: Path = Field(REPO_ROOT / "ssl_cert" / "cert.pem", alias="TLS_CERT_FILE")
    tls_key_file: Path = Field(REPO_ROOT / "ssl_cert" / "key.pem", alias="TLS_KEY_FILE")
    # Every open GET /jobs/<id>/events stream holds one of these threads.
    http_threads: int = Field(32, alias="HTTP_THREADS", ge=1, le=1024)
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field((), alias="CORS_ORIGINS")
    # From a request's first byte to the end of its headers (the TLS handshake included); a client
    # slower than that is disconnected, so that slow or idle clients cannot hold the HTTP threads.
    request_head_timeout_s: float = Field(10.0, alias="REQUEST_HEAD_TIMEOUT_S", gt=0, le=3600)

    sd_model: str = Field(SD15_MODEL_ID, alias="SD_MODEL", min_length=1)
    controlnet_model: str = Field(SD15_CANNY_CONTROLNET_ID, alias="CONTROLNET_MODEL", min_length=1)
    # SD_MODEL and CONTROLNET_MODEL may be single .safetensors files; a .ckpt runs code as it loads, so only with this.
    allow_pickle_checkpoints: bool = Field(False, alias="ALLOW_PICKLE_CHECKPOINTS")
    # LoRA files (.safetensors, kohya / AUTOMATIC1111 layout) requests may name, and how many stay loaded.
    lora_dir: Path = Field(REPO_ROOT / "models" / "lora", alias="LORA_DIR")
    lora_cache: int = Field(8, alias="LORA_CACHE", ge=1, le=256)
    # cuda:N picks one GPU of several (one GPU worker process per GPU).
    device: str = Field("auto", alias="DEVICE", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", alias="DTYPE")
    # Speed: channels-last memory for the convolutions (auto: on a GPU), and torch.compile of the UNet
    # and ControlNet in one of its modes, compiled and warmed up before /ready answers 200.
    channels_last: Literal["auto", "on", "off"] = Field("auto", alias="CHANNELS_LAST")
    torch_compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field("off", alias="TORCH_COMPILE")
    )

    default_resolution: int = Field(512, alias="DEFAULT_RESOLUTION", ge=64, le=4096, multiple_of=8)
    max_resolution: int = Field(1024, alias="MAX_RESOLUTION", ge=64, le=4096, multiple_of=8)
    # Output sizes (WIDTHxHEIGHT) the warm-up compiles for, with TORCH_COMPILE on; none: DEFAULT_RESOLUTION
    # square. A size left out compiles on its first request.
    warm_up_sizes: Annotated[tuple[tuple[int, int], ...], NoDecode] = Field((), alias="WARM_UP_SIZES")
    default_steps: int = Field(20, alias="DEFAULT_STEPS", ge=1, le=500)
    max_steps: int = Field(100, alias="MAX_STEPS", ge=1, le=500)
    refine_strength: float = Field(0.3, alias="REFINE_STRENGTH", ge=0.0, le=1.0)

    max_upload_mb: float = Field(20.0, alias="MAX_UPLOAD_MB", gt=0, le=1024)
    max_image_pixels: int = Field(40_000_000, alias="MAX_IMAGE_PIXELS", ge=1)
    max_gif_frames: int = Field(48, alias="MAX_GIF_FRAMES", ge=1, le=10_000)
    max_prompt_chars: int = Field(1000, alias="MAX_PROMPT_CHARS", ge=1, le=100_000)
    # Uploads decoded at once (each up to about 9 bytes per pixel of MAX_IMAGE_PIXELS while decoding);
    # others wait up to 10 s, then get 503.
    max_concurrent_decodes: int = Field(2, alias="MAX_CONCURRENT_DECODES", ge=1, le=1024)

    queue_size: int = Field(16, alias="QUEUE_SIZE", ge=1, le=10_000)
    # Queued requests of one size, steps and sampler share a denoising run of up to this many pictures
    # (1 turns batching off); the worker waits this long for companions.
    batch_size: int = Field(8, alias="BATCH_SIZE", ge=1, le=256)
    batch_wait_ms: float = Field(10.0, alias="BATCH_WAIT_MS", ge=0, le=10_000)
    # Per API key: requests queued or running at once, and requests per minute to the endpoints that
    # make work (/generate, /jobs, /preprocess); 0 turns the rate limit off.
    max_queued_per_key: int = Field(8, alias="MAX_QUEUED_PER_KEY", ge=1, le=10_000)
    rate_limit_per_minute: int = Field(120, alias="RATE_LIMIT_PER_MINUTE", ge=0, le=1_000_000)
    generation_timeout_s: float = Field(600.0, alias="GENERATION_TIMEOUT_S", gt=0)
    shutdown_grace_s: float = Field(60.0, alias="SHUTDOWN_GRACE_S", gt=0, le=3600)

    # local: the model in this process (nothing else to start). celery: web processes only here, GPU workers
    # (python -m stable_diffusion.gpu_worker) elsewhere, a Redis server between them; the URL may carry a password.
    queue_backend: Literal["local", "celery"] = Field("local", alias="QUEUE_BACKEND")
    redis_url: str = Field("redis://localhost:6379/0", alias="REDIS_URL", repr=False, pattern=r"^rediss?://")
    # Web processes gunicorn runs; more than one only with QUEUE_BACKEND=celery (the model lives elsewhere).
    web_workers: int = Field(1, alias="WEB_WORKERS", ge=1, le=256)
    # A task a GPU worker took and did not finish (its process killed) goes back to the queue after this long.
    task_visibility_timeout_s: float = Field(900.0, alias="TASK_VISIBILITY_TIMEOUT_S", gt=0)

    jobs_db: Path = Field(REPO_ROOT / "jobs.sqlite3", alias="JOBS_DB")
    job_retention_s: float = Field(7 * 24 * 3600, alias="JOB_RETENTION_S", gt=0)

    input_dir: Path = Field(REPO_ROOT / "input_images", alias="INPUT_DIR")
    output_dir: Path = Field(REPO_ROOT / "output_images", alias="OUTPUT_DIR")
    log_file: Path = Field(REPO_ROOT / "api.log", alias="LOG_FILE")
    log_max_bytes: int = Field(10_000_000, alias="LOG_MAX_BYTES", ge=1024)
    log_backups: int = Field(5, alias="LOG_BACKUPS", ge=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _api_key_is_set(cls, values: Any) -> Any:
        # Before the fields, so that a missing key says how to set one; SettingsError passes through pydantic.
        if isinstance(values, dict) and not values.get("API_KEY") and "api_keys" not in values:
            raise SettingsError(
                "API_KEY is not set: add API_KEY=<a long random string> to .env "
                "(see .env.example) or export it in the environment."
            )
        return values

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_well_formed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            entry_digest(entry)
        return value

    @field_validator("warm_up_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        sizes = []
        for entry in filter(None, (part.strip() for part in value.split(","))):
            width, separator, height = entry.lower().partition("x")
            if not (separator and width.isdigit() and height.isdigit()):
                raise ValueError(f"{entry!r} is not WIDTHxHEIGHT; write sizes like 512x512,512x384")
            sizes.append((int(width), int(height)))
        return tuple(sizes)

    @field_validator("warm_up_sizes")
    @classmethod
    def _sizes_servable(cls, value: tuple[tuple[int, int], ...], info) -> tuple[tuple[int, int], ...]:
        largest = info.data.get("max_resolution", 4096)
        for width, height in value:
            if width % 8 or height % 8 or not 8 <= min(width, height) <= max(width, height) <= largest:
                raise ValueError(
                    f"{width}x{height} is not an output size: both sides multiples of 8, at most "
                    f"MAX_RESOLUTION ({largest})"
                )
        return value

    @field_validator("max_resolution", "max_steps")
    @classmethod
    def _max_covers_default(cls, value: int, info) -> int:
        default_field = {"max_resolution": "default_resolution", "max_steps": "default_steps"}[info.field_name]
        default = info.data.get(default_field)
        if default is not None and value < default:
            raise ValueError(f"must be at least {default_field.upper()} ({default})")
        return value

    @model_validator(mode="after")
    def _one_model_per_process(self) -> Settings:
        if self.web_workers > 1 and self.queue_backend == "local":
            raise ValueError(
                "WEB_WORKERS above 1 needs QUEUE_BACKEND=celery: in local mode every web process would load "
                "its own copy of the model"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No env_settings: it can only read os.environ, and a caller's `environ` must replace that, not mix
        # with it; so load() hands the environment in as init kwargs, which outrank the .env file.
        return init_settings, _EnvFileSource(settings_cls, env_file=dotenv_settings.env_file)

    @classmethod
    def load(
        cls,
        env_file: Path | None = DEFAULT_ENV_FILE,
        environ: Mapping[str, str] | None = None,
        **overrides: object,
    ) -> Settings:
        """Read `env_file` (SD_ENV_FILE in `environ` replaces the default), let `environ` (default: the
        process environment) win, then `overrides`."""
        environ = os.environ if environ is None else environ
        env_file = _chosen_env_file(env_file, environ)
        # Only the settings' own names: the rest of the environment is not ours, and BaseSettings would take
        # a variable named like one of its options (_env_file, _cli_parse_args) as that option.
        names = {key for name, field in cls.model_fields.items() for key in (name, field.alias)}
        values = {key: value for key, value in environ.items() if key in names} | overrides
        try:
            return cls(_env_file=env_file, **values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None


def environment_overrides(
    env_file: Path | None = DEFAULT_ENV_FILE, environ: Mapping[str, str] | None = None
) -> list[str]:
    """The settings the env file sets that the environment replaces with another value: their names only
    (values may be secret), for start-up to say so rather than serve with a key the user did not expect."""
    environ = os.environ if environ is None else environ
    env_file = _chosen_env_file(env_file, environ)
    if env_file is None or not env_file.is_file():
        return []
    in_file = dotenv_values(env_file)
    names = {field.alias or name for name, field in Settings.model_fields.items()}
    return sorted(name for name in names if in_file.get(name) and environ.get(name, in_file[name]) != in_file[name])


def _chosen_env_file(env_file: Path | None, environ: Mapping[str, str]) -> Path | None:
    """SD_ENV_FILE in `environ` replaces the default file; empty, no file is read."""
    if env_file == DEFAULT_ENV_FILE and ENV_FILE_VARIABLE in environ:
        return Path(environ[ENV_FILE_VARIABLE]) if environ[ENV_FILE_VARIABLE] else None
    return env_file


class _EnvFileSource(DotEnvSettingsSource):
    """The .env file, refusing the certificate's old names there (in the environment, SSL_CERT_FILE is OpenSSL's)."""

    def __call__(self) -> dict[str, Any]:
        for old, new in RENAMED_SETTINGS.items():
            if self.env_vars.get(old) is not None:
                raise SettingsError(
                    f"{self.env_file} sets {old}, which the server no longer reads: OpenSSL, curl and pip read "
                    f"that name as the trusted CA bundle. Rename it to {new}."
                )
        return super().__call__()


def _describe(exc: ValidationError) -> str:
    """Name each invalid setting without echoing secret values."""
    aliases = {name: field.alias or name for name, field in Settings.model_fields.items()}
    problems = []
    for error in exc.errors():
        name = aliases.get(str(error["loc"][0]), str(error["loc"][0])) if error["loc"] else "settings"
        shown = "" if name in SECRET_SETTINGS else f" (got {error['input']!r})"
        problems.append(f"invalid setting {name}{shown}: {error['msg']}")
    return "; ".join(problems)
