"""The log set-up (``proxy/observe/logs.py``) and the access line (``proxy/observe/access_log.py``)
in-process: the ``logging`` section and its precedence (flag > environment > file),
the JSON formatter on ordinary records, the text rendering, turning the access log off,
and the redacted start-up config. tests/test_access_log.py runs the real process."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from proxy.config.loader import ConfigError, Overrides, config_from_dict, load_config
from proxy.config.logs import LoggingSettings
from proxy.observe.access_log import AccessLine, AccessLog, line
from proxy.observe.logs import (
    ACCESS_LOGGER,
    CURRENT_REQUEST,
    FLUSH_AFTER,
    Fields,
    JsonFormatter,
    configure,
    iso_time,
    redacted,
)
from proxy.providers import PROVIDER_TYPES
from proxy.record import Origin, Record, Usage
from tests.polling import until


@pytest.fixture
def restored() -> Iterator[None]:
    """``configure`` changes the process's root logger: put it back afterwards."""
    root = logging.getLogger()
    access = logging.getLogger(ACCESS_LOGGER)
    handlers, level, access_level = list(root.handlers), root.level, access.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        access.setLevel(access_level)


def loaded(tmp_path: Path, text: str, env: dict[str, str], flag: str | None) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    config = load_config(Overrides(config_path=path, log_level=flag), env,
                         PROVIDER_TYPES.keys())
    return config.logging.level


def test_level_precedence_flag_then_environment_then_file(tmp_path: Path) -> None:
    file = "logging: {level: error}\n"
    assert loaded(tmp_path, file, {}, None) == "ERROR"
    assert loaded(tmp_path, file, {"PROXY_LOG_LEVEL": "debug"}, None) == "DEBUG"
    assert loaded(tmp_path, file, {"PROXY_LOG_LEVEL": "debug"}, "WARNING") == "WARNING"
    assert loaded(tmp_path, "logging:\n", {}, "WARNING") == "WARNING"  # an empty section
    assert loaded(tmp_path, "", {}, None) == "INFO"


def test_bad_logging_settings_are_named_with_their_path() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"logging": {"level": "loud", "format": "xml", "access_log": "no",
                                      "colour": True}}, {}, PROVIDER_TYPES.keys())
    problems = caught.value.problems
    assert any(p.startswith("logging.level: must be one of DEBUG") for p in problems)
    assert any(p.startswith("logging.format: ") for p in problems)
    assert any(p.startswith("logging.access_log: must be true or false") for p in problems)
    assert any(p.startswith("logging.colour: unknown key") for p in problems)


def record(message: object, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("proxy.x", logging.ERROR, __file__, 1, message, args, info)


def test_json_formatter_writes_one_object_with_the_request_and_the_exception() -> None:
    formatter = JsonFormatter()
    named = CURRENT_REQUEST.set("req-1")
    try:
        text = formatter.format(record("failed %s", "here", exc=True))
    finally:
        CURRENT_REQUEST.reset(named)
    assert "\n" not in text
    line_ = orjson.loads(text)
    assert (line_["level"], line_["logger"], line_["message"], line_["request_id"]) == (
        "ERROR", "proxy.x", "failed here", "req-1")
    assert "ValueError: boom" in line_["exception"]
    assert "request_id" not in orjson.loads(formatter.format(record("outside")))
    structured = orjson.loads(formatter.format(record(Fields({"message": "m", "n": 1}))))
    assert (structured["message"], structured["n"]) == ("m", 1)


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert iso_time(0.25) == "1970-01-01T00:00:00.250Z"
    assert iso_time(86400.5) == "1970-01-02T00:00:00.500Z"
    assert iso_time(86400.125) == "1970-01-02T00:00:00.125Z"  # the cached second


def served() -> Record:
    done = Record(10.0, "POST", "/v1/chat/completions", "id-1", "127.0.0.1", "team-a",
                  "m", True, Origin("up", "m-up", 2, "failover"), "miss", "leader",
                  status=200, upstream_status=200, upstream_wait=0.5, first_byte=10.6,
                  finished=11.0, bytes_in=10, bytes_out=20, usage=Usage(3, 5))
    return done


def test_the_access_line_fields() -> None:
    fields = line(served(), 0.0)
    assert (fields["provider"], fields["upstream_model"], fields["attempts"],
            fields["taken"]) == ("up", "m-up", 2, "failover")
    assert (fields["ttfb_ms"], fields["duration_ms"], fields["upstream_ms"]) == (
        600.0, 1000.0, 500.0)
    assert fields["overhead_ms"] == pytest.approx(100.0)  # before the first byte only
    assert (fields["tokens_in"], fields["tokens_out"], fields["tokens_source"]) == (
        3, 5, "reported")
    refused = line(Record(1.0, "GET", "other", "id-2", None, status=401, finished=1.001),
                   0.0)
    assert (refused["provider"], refused["attempts"], refused["tokens_in"]) == (None, 0, None)
    text = str(AccessLine(fields, whole=True))
    assert text.startswith("POST /v1/chat/completions 200 1000.0ms request_id=id-1 ")
    assert "key_name=team-a" in text and "error_code" not in text


@pytest.mark.usefixtures("restored")
def test_configure_json_text_and_the_access_log_off() -> None:
    stream = io.StringIO()
    configure(LoggingSettings(format="json"), stream)
    AccessLog()([served()])
    logging.getLogger("proxy.y").info("hello")
    configure(LoggingSettings(format="text", access_log=False), stream)  # replaced
    AccessLog()([served()])
    logging.getLogger("proxy.y").info("as text")
    written = stream.getvalue().splitlines()
    assert len(written) == 3, written
    access, hello = (orjson.loads(x) for x in written[:2])
    assert (access["logger"], access["request_id"], access["time"][-1]) == (
        "proxy.access", "id-1", "Z")
    assert hello["message"] == "hello"
    assert written[2].endswith(" INFO proxy.y: as text")
    assert repr(AccessLog()) == "<AccessLog proxy.access on=False>"


def test_the_startup_config_is_redacted() -> None:
    config = config_from_dict({
        "providers": [{"name": "p", "type": "openai_compat", "api_key_env": "P_KEY",
                       "base_url": "http://u:pw-77@127.0.0.1:1/v1",
                       "headers": {"X-Api-Key": "hdr-secret-9"}}],
        "auth": {"keys": [{"name": "k", "sha256": "a" * 64}]},
        "redis": {"url": "redis://:redis-pass-5@127.0.0.1:6379/0"}},
        {"P_KEY": "sk-env-secret-3"}, PROVIDER_TYPES.keys())
    plain = redacted(config)
    text = orjson.dumps(plain).decode()
    for secret in ("pw-77", "hdr-secret-9", "a" * 64, "redis-pass-5", "sk-env-secret-3"):
        assert secret not in text
    provider = plain["providers"][0]
    assert provider["headers"] == {"X-Api-Key": "***"} and provider["api_key"] == "***"
    assert plain["redis"]["url"] == "redis://***@127.0.0.1:6379/0"
    assert plain["auth"]["keys"][0]["name"] == "k"


async def test_access_lines_are_written_together_and_none_waits_long() -> None:
    """Batched: one write for many access lines (a write per request showed in the
    profile), at most FLUSH_AFTER late; any other line goes out at once, after them."""
    stream = io.StringIO()
    configure(LoggingSettings(format="json"), stream)
    try:
        access = logging.getLogger(ACCESS_LOGGER)
        for n in range(3):
            access.info("line %d", n)
        assert stream.getvalue() == ""
        await until(stream.getvalue, within=FLUSH_AFTER + 0.2,
                    what="the access lines' timer to write them")
        assert [orjson.loads(x)["message"] for x in stream.getvalue().splitlines()] == [
            "line 0", "line 1", "line 2"]
        access.info("line 3")
        logging.getLogger("proxy.test").warning("at once")
        assert [orjson.loads(x)["message"] for x in stream.getvalue().splitlines()][3:] == [
            "line 3", "at once"]
    finally:
        configure(LoggingSettings(format="json"), io.StringIO())
