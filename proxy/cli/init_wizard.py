"""``proxy init``: a commented starter ``proxy.yaml`` from what this machine has.

It looks for a local Ollama (``GET /api/tags`` at ``OLLAMA_HOST``, default
127.0.0.1:11434) and for provider keys in the environment, asks on the terminal which
to keep, the port, and whether to add a gateway key, then writes the file. Provider keys
are written as ``api_key_env: NAME`` (the variable's name, never its value) and a
gateway key as its sha256 only (the secret is printed once), so the file holds nothing
secret. The text is validated by the config loader before it is written: what ``init``
writes, ``proxy check --offline`` accepts.

Without a terminal on stdin and without ``--yes`` it refuses (exit 2) instead of
guessing: a CI job or a pipe must never hang on a question, nor get a config nobody
agreed to.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import uvloop
import yaml
from yarl import URL

from proxy import __version__
from proxy.config.keys import hash_secret, new_secret
from proxy.config.loader import DEMO_PROVIDER, ConfigError, config_from_dict

OLLAMA_DEFAULT = "127.0.0.1:11434"
OLLAMA_PORT = 11434
PROBE_SECONDS = 2.0  # a local Ollama answers in milliseconds; none there must not stall
DEFAULT_PORT = 8080
ATTEMPTS = 3  # invalid answers to one question before giving up (exit 2)
KEY_NAME = "admin"

# OpenAI-compatible APIs: (provider name, key variable, base URL). `openai_compat`
# passes their bytes through untouched; OPENAI_BASE_URL moves `openai` (as at run time).
KEY_PROVIDERS = (
    ("openai", "OPENAI_API_KEY", "https://api.openai.com/v1"),
    ("openrouter", "OPENROUTER_API_KEY", "https://openrouter.ai/api/v1"),
    ("groq", "GROQ_API_KEY", "https://api.groq.com/openai/v1"),
    ("together", "TOGETHER_API_KEY", "https://api.together.xyz/v1"),
    ("mistral", "MISTRAL_API_KEY", "https://api.mistral.ai/v1"),
    ("deepseek", "DEEPSEEK_API_KEY", "https://api.deepseek.com/v1"),
    ("fireworks", "FIREWORKS_API_KEY", "https://api.fireworks.ai/inference/v1"),
)
# Keys of APIs no provider type speaks (their native APIs are not OpenAI's): named, skipped.
UNSUPPORTED_KEYS = ("ANTHROPIC_API_KEY", "GEMINI_API_KEY", "COHERE_API_KEY")
_PLAIN = re.compile(r"[A-Za-z0-9_./:@+-]+")


def run(path: Path, env: Mapping[str, str], types: Collection[str], *, yes: bool,
        force: bool, interactive: bool) -> int:
    """Exit 0 written; 1 not written (the file exists without ``force``, the questions
    ended unanswered, it cannot be written); 2 nobody to ask and no ``--yes``."""
    if path.exists() and not force:
        return _exists(path)
    if not yes and not interactive:
        print("init: stdin is not a terminal, so there is no one to answer the questions: "
              "run it on one, or pass --yes to take the defaults", file=sys.stderr)
        return 2
    found = uvloop.run(detect(env))
    skipped = unsupported_keys(env)
    _report(found, skipped, ollama_url(env))
    try:
        choices = Choices(tuple(found)) if yes else interview(found)
    except (InitAborted, KeyboardInterrupt) as exc:
        print(f"\ninit: {exc or 'interrupted'}; nothing written", file=sys.stderr)
        return 1
    text = render(choices, skipped, ollama_url(env))
    if problems := validate(text, env, types):  # a bug in render(): never write it
        for problem in problems:
            print(f"init: the config it would write is invalid: {problem}", file=sys.stderr)
        return 2
    return _write(path, text, choices, force=force)


def _write(path: Path, text: str, choices: Choices, *, force: bool) -> int:
    try:
        write_new(path, text, force=force)
    except FileExistsError:  # made meanwhile
        return _exists(path)
    except OSError as exc:
        print(f"init: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    _written(path, choices)
    return 0


async def detect(env: Mapping[str, str]) -> list[Found]:
    ollama = await find_ollama(env)
    return ([ollama] if ollama else []) + keyed_providers(env)


def _report(found: Sequence[Found], skipped: Sequence[str], ollama_at: str) -> None:
    print("Found:" if found else "Found no provider.")
    for f in found:
        print(f"  {f.describe()}")
    if not any(f.type == "ollama" for f in found):
        print(f"  no Ollama answered at {ollama_at}")
    for name in skipped:
        print(f"  ${name} is set, but no provider type speaks that API: skipped")


def _written(path: Path, choices: Choices) -> None:
    names = ", ".join(f.name for f in choices.providers) or (
        f"none: `proxy serve` answers from the built-in mock ({DEMO_PROVIDER!r})")
    print(f"wrote {path}: port {choices.port}; providers: {names}")
    if choices.key_secret is not None:
        print(f"gateway key {KEY_NAME!r}: {choices.key_secret}")
        print("  (clients send it as their API key; it is shown only now, the file holds "
              "its sha256)")
    print(f"next: proxy check --offline --config {path}, then proxy serve --config {path}")


def _exists(path: Path) -> int:
    print(f"init: {path} already exists; not overwritten (--force replaces it)",
          file=sys.stderr)
    return 1


class InitAborted(Exception):
    """The questions ended without an answer (end of input, too many invalid ones)."""


@dataclass(frozen=True, slots=True)
class Found:
    """One provider ``init`` can write: where it is and what proved it is there."""

    name: str
    type: str
    base_url: str
    key_env: str | None = None
    models: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.key_env:
            return f"{self.name}: ${self.key_env} is set ({self.base_url})"
        return f"{self.name}: Ollama at {self.base_url}, {len(self.models)} models"


@dataclass(frozen=True, slots=True)
class Choices:
    providers: tuple[Found, ...]
    port: int = DEFAULT_PORT
    key_secret: str | None = None  # printed once; only its sha256 is written


def ollama_url(env: Mapping[str, str]) -> str:
    """``OLLAMA_HOST`` as Ollama's own client reads it: without a scheme, http and port
    11434 unless given; with one, that scheme's default port."""
    host = env.get("OLLAMA_HOST", "").strip() or OLLAMA_DEFAULT
    schemed = host.startswith(("http://", "https://"))
    text = host if schemed else f"http://{host}"
    try:
        url = URL(text)
        if not schemed and url.explicit_port is None and url.host:
            url = url.with_port(OLLAMA_PORT)
    except ValueError:  # asked as typed: the probe fails and says where it looked
        return text.rstrip("/")
    return str(url).rstrip("/")


async def find_ollama(env: Mapping[str, str]) -> Found | None:
    """A local Ollama, if one answers ``/api/tags`` within ``PROBE_SECONDS``."""
    base = ollama_url(env)
    timeout = aiohttp.ClientTimeout(total=PROBE_SECONDS)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(f"{base}/api/tags") as response:
            if response.status != 200:
                return None
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    listed = body.get("models") if isinstance(body, dict) else None
    names = (m.get("name") for m in listed or () if isinstance(m, dict))
    return Found("ollama", "ollama", base,
                 models=tuple(n for n in names if isinstance(n, str) and n))


def keyed_providers(env: Mapping[str, str]) -> list[Found]:
    found = [Found(name, "openai_compat", url, key_env=key_env)
             for name, key_env, url in KEY_PROVIDERS if env.get(key_env)]
    if found and found[0].name == "openai" and env.get("OPENAI_BASE_URL"):
        found[0] = replace(found[0], base_url=env["OPENAI_BASE_URL"].rstrip("/"))
    return found


def unsupported_keys(env: Mapping[str, str]) -> list[str]:
    return [name for name in UNSUPPORTED_KEYS if env.get(name)]


def ask(prompt: str) -> str:
    """One answer from the terminal, stripped; empty for a bare Enter."""
    try:
        return input(prompt).strip()
    except EOFError:
        raise InitAborted("no answer (end of input)") from None


def ask_yes(question: str, default: bool) -> bool:
    for _ in range(ATTEMPTS):
        answer = ask(f"{question} [{'Y/n' if default else 'y/N'}] ").lower()
        if not answer:
            return default
        if answer in {"y", "yes", "n", "no"}:
            return answer.startswith("y")
        print("  please answer y or n")
    raise InitAborted(f"no valid answer to: {question}")


def ask_port(default: int) -> int:
    for _ in range(ATTEMPTS):
        answer = ask(f"Port to listen on [{default}] ") or str(default)
        if answer.isdigit() and 1 <= int(answer) <= 65535:
            return int(answer)
        print("  a port is a number from 1 to 65535")
    raise InitAborted("no valid port")


def interview(found: Sequence[Found]) -> Choices:
    """The questions, in order; every default is what ``--yes`` takes, except the
    gateway key (yes here: its secret is shown only to the person at the terminal)."""
    chosen = tuple(f for f in found if ask_yes(f"Include {f.describe()}?", True))
    port = ask_port(DEFAULT_PORT)
    key = ask_yes("Add a gateway key (clients must then send it)?", True)
    return Choices(chosen, port, new_secret() if key else None)


def render(choices: Choices, skipped: Collection[str], ollama_at: str) -> str:
    """The file's text: YAML with comments saying where each entry came from."""
    lines = [
        f"# proxy.yaml, written by `proxy init` (proxy {__version__}).",
        "# Every key is described in the README's Configuration section. Check this file",
        "# with `proxy check --offline`, the providers with `proxy check`, then run",
        "# `proxy serve`.",
        "server:",
        "  host: 127.0.0.1          # this machine only; 0.0.0.0 for every interface",
        f"  port: {choices.port}",
    ]
    lines += _providers(choices.providers, ollama_at)
    for name in skipped:
        lines.append(f"# {name} is set, but no provider type speaks that API: not added.")
    if choices.key_secret is not None:
        lines += ["auth:", "  keys:                    # clients send the secret as their API key",
                  f"    - name: {KEY_NAME}",
                  f"      sha256: {hash_secret(choices.key_secret)}"]
    else:
        lines += ["# No gateway key: anyone who can reach the port may use it; `proxy keys hash`",
                  "# prints an auth.keys entry to paste here."]
    return "\n".join(lines) + "\n"


def _providers(found: Sequence[Found], ollama_at: str) -> list[str]:
    if not found:
        return [
            f"# No provider found: no Ollama answered at {_comment(ollama_at)} and no",
            "# provider key is set. Until you name one here, `proxy serve` answers from",
            f"# its built-in mock upstream (provider {DEMO_PROVIDER!r}, any model name),",
            "# and `proxy check` has nothing to check. For example:",
            "# providers:",
            "#   - name: ollama",
            "#     type: ollama",
            f"#     base_url: http://{OLLAMA_DEFAULT}",
            "#   - name: openai",
            "#     type: openai_compat",
            "#     base_url: https://api.openai.com/v1",
            "#     api_key_env: OPENAI_API_KEY   # the variable's name, never the key",
        ]
    lines = ["providers:"]
    for f in found:
        if f.models:
            shown = ", ".join(f.models[:10]) + (", ..." if len(f.models) > 10 else "")
            lines.append(f"  # models found now (discovered again at run time): "
                         f"{_comment(shown)}")
        lines += [f"  - name: {f.name}", f"    type: {f.type}",
                  f"    base_url: {_scalar(f.base_url)}"]
        if f.key_env:
            lines.append(f"    api_key_env: {f.key_env}   # the variable's name: the key "
                         "itself is never written here")
    return lines


def _scalar(value: str) -> str:
    """A YAML scalar: plain when safe, else double-quoted (JSON strings are YAML)."""
    return value if _PLAIN.fullmatch(value) else yaml.safe_dump(value, default_style='"',
                                                              width=1 << 16).strip()


def _comment(text: str) -> str:
    """Text from the environment or an upstream, safe on one comment line."""
    return "".join(c if c.isprintable() else "?" for c in text)


def validate(text: str, env: Mapping[str, str], types: Collection[str]) -> list[str]:
    """The loader's problems with ``text`` (none expected: a bug if any)."""
    try:
        config_from_dict(yaml.safe_load(text), env, types)
    except ConfigError as exc:
        return exc.problems
    return []


def write_new(path: Path, text: str, *, force: bool) -> None:
    """Create ``path`` (``FileExistsError`` if it exists, unless ``force``); a forced
    write replaces the old file in one rename, never leaving half of either."""
    if not force:
        with path.open("x", encoding="utf-8") as file:
            file.write(text)
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
