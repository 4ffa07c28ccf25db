from __future__ import annotations

from pathlib import Path

import pytest

from memshift.config import Settings, describe, load_settings, redact
from memshift.errors import ConfigError

PASSWORD = "s3cr3t-pw"
REDIS_WITH_PW = f"redis://:{PASSWORD}@cache.internal:6379/0"
DSN_URL_WITH_PW = f"postgresql://app:{PASSWORD}@db.internal:5432/memory"
DSN_KV_WITH_PW = f"host=db.internal dbname=memory user=app password={PASSWORD}"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No memshift.toml of the developer's own is picked up by accident."""
    monkeypatch.chdir(tmp_path)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "memshift.toml"
    path.write_text(text)
    return path


def load(
    overrides: dict[str, object | None] | None = None,
    env: dict[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    return load_settings(overrides or {}, env=env or {}, config_file=config_file)


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_defaults_when_nothing_is_set() -> None:
    settings = load()

    assert settings == Settings(
        redis_url=None,
        postgres_dsn=None,
        layout="reference",
        prefix="agent",
        ttl_seconds=None,
        data_dir=Path(".memshift"),
    )


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    write_toml(tmp_path, '[memshift]\nprefix = "from-toml"\nttl_seconds = 60\n')

    settings = load()

    assert (settings.prefix, settings.ttl_seconds, settings.layout) == (
        "from-toml",
        60,
        "reference",
    )


def test_toml_may_use_top_level_keys(tmp_path: Path) -> None:
    write_toml(tmp_path, 'layout = "flat"\n')

    assert load().layout == "flat"


def test_environment_overrides_toml(tmp_path: Path) -> None:
    write_toml(tmp_path, '[memshift]\nprefix = "from-toml"\nlayout = "from-toml"\n')

    settings = load(env={"MEMSHIFT_PREFIX": "from-env"})

    assert (settings.prefix, settings.layout) == ("from-env", "from-toml")


def test_flags_override_environment_and_toml(tmp_path: Path) -> None:
    write_toml(tmp_path, '[memshift]\nttl_seconds = 60\nprefix = "from-toml"\n')

    settings = load(
        overrides={"ttl_seconds": 5, "prefix": None},
        env={"MEMSHIFT_TTL_SECONDS": "30", "MEMSHIFT_PREFIX": "from-env"},
    )

    assert (settings.ttl_seconds, settings.prefix) == (5, "from-env")


def test_empty_environment_variable_counts_as_unset() -> None:
    assert load(env={"MEMSHIFT_REDIS_URL": ""}).redis_url is None


def test_environment_strings_are_parsed_into_their_types() -> None:
    settings = load(env={"MEMSHIFT_TTL_SECONDS": "3600", "MEMSHIFT_DATA_DIR": "/var/lib/ms"})

    assert (settings.ttl_seconds, settings.data_dir) == (3600, Path("/var/lib/ms"))


def test_explicit_config_file_is_read_and_relative_data_dir_follows_it(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = conf_dir / "other.toml"
    path.write_text('[memshift]\ndata_dir = "state"\n')

    assert load(config_file=path).data_dir == conf_dir / "state"


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    message = config_error(config_file=tmp_path / "nope.toml")

    assert "nope.toml" in message and "does not exist" in message


def test_all_three_redis_schemes_are_accepted() -> None:
    for url in ("redis://localhost:6379/0", "rediss://h:6380", "unix:///run/redis.sock"):
        assert load(overrides={"redis_url": url}).redis_url == url


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis://h:port/0"])
def test_bad_redis_url_names_the_setting_and_what_to_set(url: str) -> None:
    message = config_error(env={"MEMSHIFT_REDIS_URL": url})

    assert "--redis-url" in message
    assert "MEMSHIFT_REDIS_URL" in message
    assert "`redis_url` in memshift.toml" in message
    assert "redis://" in message and "unix://" in message


def test_unparseable_dsn_names_the_setting() -> None:
    message = config_error(overrides={"postgres_dsn": "host=x nonsense"})

    assert "--postgres-dsn" in message and "MEMSHIFT_POSTGRES_DSN" in message
    assert "cannot be parsed" in message and "postgresql://" in message


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    write_toml(tmp_path, '[memshift]\nredis_uri = "redis://h"\n')

    message = config_error()

    assert "unknown key(s) redis_uri" in message and "redis_url" in message


def test_top_level_keys_next_to_the_memshift_table_are_an_error(tmp_path: Path) -> None:
    write_toml(tmp_path, 'prefix = "x"\n[memshift]\nlayout = "reference"\n')

    assert "outside the [memshift] table" in config_error()


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_toml(tmp_path, "[memshift\n")

    assert "memshift.toml is not valid TOML" in config_error()


@pytest.mark.parametrize(
    ("text", "setting"),
    [('ttl_seconds = "60"', "ttl_seconds"), ("prefix = 7", "prefix"), ("data_dir = 1", "data_dir")],
)
def test_wrong_type_in_toml_is_an_error(tmp_path: Path, text: str, setting: str) -> None:
    write_toml(tmp_path, f"[memshift]\n{text}\n")

    message = config_error()

    assert f"setting {setting}" in message and "expected" in message


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_ttl_must_be_a_positive_whole_number(value: str) -> None:
    message = config_error(env={"MEMSHIFT_TTL_SECONDS": value})

    assert "MEMSHIFT_TTL_SECONDS" in message and "positive integer" in message


def test_prefix_with_spaces_is_refused() -> None:
    assert "not a plain name" in config_error(overrides={"prefix": "my prefix"})


def test_unknown_override_is_an_error() -> None:
    assert "unknown setting(s) colour" in config_error(overrides={"colour": "blue"})


def test_settings_built_directly_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        Settings(redis_url="http://x")


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        (REDIS_WITH_PW, "redis://:***@cache.internal:6379/0"),
        (DSN_URL_WITH_PW, "postgresql://app:***@db.internal:5432/memory"),
        (DSN_KV_WITH_PW, "host=db.internal dbname=memory user=app password=***"),
        (f"host=h password='{PASSWORD} x'", "host=h password=***"),
        (
            f"postgresql://h/db?password={PASSWORD}&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("postgresql://postgres@/postgres?host=/tmp", "postgresql://postgres@/postgres?host=/tmp"),
    ],
)
def test_redact_hides_passwords_only(secret: str, shown: str) -> None:
    assert redact(secret) == shown


def test_repr_str_and_describe_never_show_the_password() -> None:
    settings = load(
        env={"MEMSHIFT_REDIS_URL": REDIS_WITH_PW, "MEMSHIFT_POSTGRES_DSN": DSN_KV_WITH_PW}
    )

    shown = describe(settings)

    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in repr(shown)
    assert shown["redis_url"] == "redis://:***@cache.internal:6379/0"
    assert settings.redis_url == REDIS_WITH_PW


@pytest.mark.parametrize(
    "env",
    [
        {"MEMSHIFT_REDIS_URL": f"http://user:{PASSWORD}@h"},
        {"MEMSHIFT_REDIS_URL": f":{PASSWORD}@h:6379"},
        {"MEMSHIFT_REDIS_URL": f"redis://:{PASSWORD}@h:notaport/0"},
        {"MEMSHIFT_REDIS_URL": f"redis://:{PASSWORD}@h/zero"},
        {"MEMSHIFT_POSTGRES_DSN": f"app:{PASSWORD}@db.internal"},
        {"MEMSHIFT_POSTGRES_DSN": f"host=h password='{PASSWORD}"},
        {"MEMSHIFT_POSTGRES_DSN": f"postgresql://app:{PASSWORD}@h/db?bogus=1"},
        {"MEMSHIFT_POSTGRES_DSN": f"password={PASSWORD} {PASSWORD}"},
        {"MEMSHIFT_POSTGRES_DSN": f"host=h password=my {PASSWORD}"},
        {"MEMSHIFT_REDIS_URL": f"redis://:my {PASSWORD}@h:6379"},
    ],
)
def test_error_messages_never_show_the_password(env: dict[str, str]) -> None:
    message = config_error(env=env)

    assert PASSWORD not in message


def test_wrongly_typed_secret_in_toml_is_not_echoed(tmp_path: Path) -> None:
    write_toml(tmp_path, f'[memshift]\nredis_url = ["redis://:{PASSWORD}@h"]\n')

    message = config_error()

    assert "expected a string, got list" in message and PASSWORD not in message


def test_a_job_needing_both_stores_names_the_settings_to_set() -> None:
    from memshift.config import Settings, require_stores
    from memshift.errors import ConfigError

    with pytest.raises(ConfigError, match=r"backfill needs both stores.*MEMSHIFT_REDIS_URL"):
        require_stores(Settings(postgres_dsn="postgresql://u:s3cr3t-pw@db/app"), "backfill")
    both = Settings(redis_url="redis://localhost:6379/0", postgres_dsn="postgresql://db/app")
    assert require_stores(both, "backfill") == ("redis://localhost:6379/0", "postgresql://db/app")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("postgres_dsn", "host=x nonsense"), ("redis_url", "redis://h:port/0")],
)
def test_the_what_to_set_template_survives_redaction_intact(setting: str, value: str) -> None:
    """The CLI redacts every error message: the template must not read as a redacted DSN."""
    message = config_error(overrides={setting: value})

    assert redact(message) == message and "***" not in message
    assert "percent-encoded" in message


def test_a_key_value_dsn_is_shown_with_its_password_as_stars_like_errors_show_it() -> None:
    settings = load(env={"MEMSHIFT_POSTGRES_DSN": "host=db user=app password='my s3cr3t'"})

    shown = describe(settings)["postgres_dsn"]

    assert shown == "user=app password=*** host=db"
    assert shown == redact("user=app password='my s3cr3t' host=db")


def test_a_redis_password_with_an_unencoded_at_sign_is_hidden_whole() -> None:
    """redis-py, like urllib, ends the userinfo at the last '@', so such a URL works."""
    settings = load(overrides={"redis_url": "redis://:Secret1@x@127.0.0.1:6379/0"})

    assert describe(settings)["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    assert "Secret1" not in repr(settings)


def test_explain_settings_says_where_each_setting_came_from(tmp_path: Path) -> None:
    from memshift.config import explain_settings

    toml = write_toml(tmp_path, '[memshift]\nlayout = "reference"\nprefix = "from-toml"\n')

    settings, origins = explain_settings(
        {"ttl_seconds": 60, "prefix": None},
        env={"MEMSHIFT_PREFIX": "from-env", "MEMSHIFT_REDIS_URL": ""},
        config_file=toml,
    )

    assert (settings.prefix, settings.layout, settings.ttl_seconds) == ("from-env", "reference", 60)
    assert origins == {
        "redis_url": "default",
        "postgres_dsn": "default",
        "layout": f"key `layout` in {toml}",
        "prefix": "environment variable MEMSHIFT_PREFIX",
        "ttl_seconds": "flag --ttl-seconds",
        "data_dir": "default",
        "secondary_timeout_seconds": "default",
    }


def test_a_dsn_password_with_an_unencoded_at_sign_is_refused_without_showing_it() -> None:
    message = config_error(overrides={"postgres_dsn": "postgresql://app:p@ss@db/app"})

    assert "unencoded '@'" in message and "%40" in message
    assert "postgresql://app:***@db/app" in message and "ss@" not in message
    assert load(overrides={"postgres_dsn": "postgresql://app:p%40ss@db/app"}).postgres_dsn
