"""Settings: read from .env, the environment winning, each invalid value named at start-up."""

from __future__ import annotations

import pytest

from service.settings import REPO_ROOT, SD15_MODEL_ID, Settings, SettingsError
from tests.conftest import tiny_settings


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("API_KEY=from-file\nSERVER_PORT=6000\nSD_MODEL=tiny\n")
    settings = Settings.load(env_file=env_file, environ={"SERVER_PORT": "7000"})
    assert settings.api_keys == ("from-file",)
    assert settings.server_port == 7000
    assert settings.sd_model == "tiny"


def test_defaults_are_the_documented_ones():
    settings = Settings.load(env_file=None, environ={"API_KEY": "k"})
    assert (settings.server_ip, settings.server_port, settings.tls) == ("::", 5000, True)
    assert settings.sd_model == SD15_MODEL_ID and settings.device == "auto" and settings.dtype == "auto"
    assert settings.default_resolution == 512 and settings.max_gif_frames == 48


def test_several_keys_are_split_on_commas():
    assert Settings.load(env_file=None, environ={"API_KEY": " a , b,,c "}).api_keys == ("a", "b", "c")


@pytest.mark.parametrize("environ", [{}, {"API_KEY": ""}, {"API_KEY": " , "}])
def test_missing_api_key_says_how_to_set_it(environ):
    with pytest.raises(SettingsError, match="API_KEY"):
        Settings.load(env_file=None, environ=environ)


@pytest.mark.parametrize(
    ("name", "value"),
    [("SERVER_PORT", "http"), ("SERVER_PORT", "70000"), ("DEVICE", "tpu"), ("DTYPE", "int8"),
     ("DEFAULT_RESOLUTION", "500"), ("MAX_UPLOAD_MB", "-1"), ("TLS", "maybe"),
     ("CHANNELS_LAST", "yes"), ("TORCH_COMPILE", "fast"), ("WARM_UP_SIZES", "512"),
     ("WARM_UP_SIZES", "512x500"), ("WARM_UP_SIZES", "512x512,2048x512")],
)
def test_invalid_setting_is_named(name, value):
    with pytest.raises(SettingsError, match=f"invalid setting {name} \\(got '{value}'\\)"):
        Settings.load(env_file=None, environ={"API_KEY": "k", name: value})


def test_warm_up_sizes_are_width_by_height_pairs():
    settings = Settings.load(env_file=None, environ={"API_KEY": "k", "WARM_UP_SIZES": "512x512, 512X384,,"})
    assert settings.warm_up_sizes == ((512, 512), (512, 384))


def test_limits_must_cover_defaults():
    with pytest.raises(SettingsError, match="MAX_RESOLUTION .*at least DEFAULT_RESOLUTION \\(512\\)"):
        Settings.load(env_file=None, environ={"API_KEY": "k", "MAX_RESOLUTION": "256"})
    with pytest.raises(SettingsError, match="MAX_STEPS .*at least DEFAULT_STEPS \\(20\\)"):
        Settings.load(env_file=None, environ={"API_KEY": "k", "MAX_STEPS": "10"})


def test_api_key_never_appears_in_messages_or_repr():
    settings = Settings.load(env_file=None, environ={"API_KEY": "very-secret-value"})
    assert "very-secret-value" not in repr(settings) and "very-secret-value" not in str(settings)
    with pytest.raises(SettingsError) as raised:
        Settings.load(env_file=None, environ={"API_KEY": "very-secret-value", "SERVER_PORT": "x"})
    assert "very-secret-value" not in str(raised.value)


def test_openssls_ssl_cert_file_is_not_the_servers_certificate(tmp_path):
    settings = Settings.load(env_file=None, environ={"API_KEY": "k", "SSL_CERT_FILE": "/etc/ssl/certs/bundle.crt"})
    assert settings.tls_cert_file == REPO_ROOT / "ssl_cert" / "cert.pem"


def test_old_certificate_names_in_env_file_say_the_new_name(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("API_KEY=k\nSSL_CERT_FILE=my/cert.pem\n")
    with pytest.raises(SettingsError, match="Rename it to TLS_CERT_FILE"):
        Settings.load(env_file=env_file, environ={})


def test_sd_env_file_names_the_settings_file_and_empty_reads_none(tmp_path):
    (tmp_path / "other.env").write_text("API_KEY=k\nSERVER_PORT=7001\n")
    assert Settings.load(environ={"SD_ENV_FILE": str(tmp_path / "other.env")}).server_port == 7001
    # Holds whatever the repository's own .env says (CI's sets API_KEY, as the README has users do).
    with pytest.raises(SettingsError, match="API_KEY is not set"):
        Settings.load(environ={"SD_ENV_FILE": ""})


def test_lists_in_the_env_file_are_comma_separated_not_json(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("API_KEY=a, b\nCORS_ORIGINS=https://a.example, https://b.example\nWARM_UP_SIZES=512x512,512x384\n")
    settings = Settings.load(env_file=env_file, environ={})
    assert settings.api_keys == ("a", "b")
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.warm_up_sizes == ((512, 512), (512, 384))


def test_overrides_win_over_the_environment_and_the_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("API_KEY=k\nSERVER_PORT=6000\nSD_MODEL=tiny\n")
    settings = Settings.load(env_file=env_file, environ={"SERVER_PORT": "7000", "SD_MODEL": "tiny2"}, SERVER_PORT=8000)
    assert (settings.server_port, settings.sd_model) == (8000, "tiny2")


def test_the_process_environment_is_read_unless_a_mapping_replaces_it(monkeypatch):
    monkeypatch.setenv("SD_ENV_FILE", "")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("SERVER_PORT", "7002")
    assert Settings.load().server_port == 7002
    assert Settings.load(environ={"API_KEY": "k"}, env_file=None).server_port == 5000


def test_variable_names_are_read_in_their_exact_case(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("api_key=from-file\n")
    with pytest.raises(SettingsError, match="API_KEY is not set"):
        Settings.load(env_file=env_file, environ={})
    assert Settings.load(env_file=None, environ={"API_KEY": "k", "Server_Port": "7000"}).server_port == 5000


def test_a_bad_redis_url_is_named_without_its_password(tmp_path):
    with pytest.raises(SettingsError) as refused:
        tiny_settings(tmp_path, QUEUE_BACKEND="celery", REDIS_URL="http://:hunter2-secret@redis:6379/0")
    assert "REDIS_URL" in str(refused.value) and "hunter2-secret" not in str(refused.value)


def test_several_web_workers_need_the_celery_backend(tmp_path):
    with pytest.raises(SettingsError, match="WEB_WORKERS.*QUEUE_BACKEND=celery"):
        tiny_settings(tmp_path, WEB_WORKERS="2")
    assert tiny_settings(tmp_path, WEB_WORKERS="2", QUEUE_BACKEND="celery").web_workers == 2
