"""Command line: ``proxy serve | init | models | check | keys hash``.

The only module that reads ``os.environ``: it hands the environment to the config
loader once. Exit codes: 0 success, 1 a provider check failed, 2 invalid configuration
or usage, 3 ``serve`` cannot listen on its address (in use, or not this host's).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import orjson
import uvloop

from proxy import __version__
from proxy.cli import init_wizard
from proxy.cli.terminal import Progress, Style, is_terminal, print_table
from proxy.config.keys import hash_secret, new_secret, parse_keys
from proxy.config.loader import Config, ConfigError, Overrides, config_file, load_config
from proxy.config.worker import WorkerSpec
from proxy.discovery import ModelCatalog, ProviderStatus, Snapshot
from proxy.observe.logs import Fields, configure, redacted
from proxy.observe.metrics_state import MULTIPROC_ENV, worker_gone
from proxy.providers import PROVIDER_TYPES, build_provider
from proxy.server.serve import CannotListen, check_port_free, demo_upstream_if_needed, serve
from proxy.server.supervisor import EXIT_CANNOT_LISTEN, PEER_SECRET_ENV, Supervisor
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient

COMMANDS = ("serve", "init", "models", "check", "keys")
log = logging.getLogger("proxy.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description="OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"proxy {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve_cmd = commands.add_parser("serve", help="run the gateway (the default command)")
    _config_flags(serve_cmd)
    serve_cmd.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve_cmd.add_argument("--workers", type=int, metavar="N",
                           help="worker processes sharing the port (default 1)")
    serve_cmd.add_argument("--socket-dir", metavar="DIR",
                           help="also listen on DIR/worker-<i>.sock, one per worker (for nginx)")
    # Set by the supervisor on the command lines of the workers it starts.
    serve_cmd.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    models_cmd = commands.add_parser("models", help="list every provider's models")
    _config_flags(models_cmd)
    models_cmd.add_argument("--json", action="store_true", help="print JSON")
    check_cmd = commands.add_parser("check", help="check every provider; exit 1 if one fails")
    _config_flags(check_cmd)
    check_cmd.add_argument("--offline", action="store_true",
                           help="only validate the configuration, like nginx -t: no provider "
                                "is contacted")
    init_cmd = commands.add_parser(
        "init", help="write a starter config from a local Ollama and the provider keys set")
    init_cmd.add_argument("--config", type=Path,
                          help="the file to write (default $PROXY_CONFIG, else ./proxy.yaml)")
    init_cmd.add_argument("--yes", action="store_true",
                          help="ask nothing: every provider found, port 8080, no gateway key")
    init_cmd.add_argument("--force", action="store_true", help="replace an existing file")
    keys_cmd = commands.add_parser("keys", help="gateway keys")
    keys_actions = keys_cmd.add_subparsers(dest="action", required=True)
    hash_cmd = keys_actions.add_parser(
        "hash", help="make a new random gateway key (or hash --secret) and print its sha256")
    hash_cmd.add_argument("--secret", help="hash this secret instead of making a new one")
    hash_cmd.add_argument("--name", default="my-key", help="the key's name in the snippet")
    hash_cmd.add_argument("--admin", action="store_true",
                          help="an admin key (reads /metrics, the status page, every key's usage)")
    return parser


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (default ./proxy.yaml)")
    parser.add_argument("--upstream", metavar="URL",
                        help="drop-in mode: one OpenAI-compatible upstream for every model")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="with --upstream: env var holding the upstream key "
                             "(default: forward the client's Authorization)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="overrides PROXY_LOG_LEVEL and logging.level (default INFO)")


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] not in {*COMMANDS, "-h", "--help", "--version"}:
        words.insert(0, "serve")  # "proxy --upstream URL" means "proxy serve --upstream URL"
    args = build_parser().parse_args(words)
    command = args.command
    if command == "keys":
        sys.exit(_keys_hash(args.secret, args.name, admin=args.admin))
    if command == "init":
        path = config_file(Overrides(config_path=args.config), os.environ) or Path("proxy.yaml")
        sys.exit(init_wizard.run(path, os.environ, PROVIDER_TYPES.keys(), yes=args.yes,
                                 force=args.force, interactive=is_terminal(sys.stdin)))
    if command == "serve":
        # Held, not lost and not fatal, until the reload handler is in place (server/serve.py,
        # server/supervisor.py); a worker inherits the mask through exec.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    config = _load(args)
    configure(config.logging)  # workers: the same flags and environment, the same logs
    if command == "serve":
        if args.worker_index is None:  # once per gateway, not once per worker
            log.info(Fields({"message": "effective config (secrets redacted)",
                             "config": redacted(config)}))
        pinned = _pinned(args)
        if args.config is None and pinned.config_path is not None:
            # Workers (restarted ones too) read the file this start found, not whatever
            # ./proxy.yaml is later: one deleted meanwhile is an error, never the defaults.
            words += ["--config", str(pinned.config_path.resolve())]
        _serve(config, words, args.worker_index, functools.partial(_reload, pinned))
    elif command == "models":
        sys.exit(uvloop.run(_models(config, os.environ, as_json=args.json)))
    elif args.offline:
        sys.exit(_check_offline(config))
    else:
        sys.exit(uvloop.run(_check(config, os.environ)))


def _keys_hash(secret: str | None, name: str, *, admin: bool = False) -> int:
    """Print a key's secret (new unless given) once, and the config entry holding only
    its hash: the secret is for the client and is stored nowhere. Exit 2 for what the
    config could not use: a blank secret (``--secret "$UNSET"`` must not hash a random
    one nobody sees) or a name the loader would refuse."""
    if secret is not None and not secret.strip():
        print("usage error: --secret is empty; leave it out to make a new random key",
              file=sys.stderr)
        return 2
    if secret is not None and secret != secret.strip():
        print("usage error: --secret starts or ends with whitespace, which the gateway "
              "strips from a presented key: the hash would never match", file=sys.stderr)
        return 2
    made = secret is None
    secret = secret or new_secret()
    digest = hash_secret(secret)
    problems: list[str] = []
    parse_keys([{"name": name, "sha256": digest}], problems)
    if problems:
        print(f"usage error: --name {name!r} would be refused by the config: "
              + "; ".join(problems), file=sys.stderr)
        return 2
    if made:
        print(f"secret: {secret}   (give it to the client; it is shown only now)")
    print(f"sha256: {digest}")
    print(f"config:\n  auth:\n    keys:\n      - name: {name}\n        sha256: {digest}"
          + ("\n        admin: true" if admin else ""))
    return 0


def _overrides(args: argparse.Namespace) -> Overrides:
    return Overrides(
        config_path=args.config, upstream=args.upstream,
        upstream_api_key_env=args.api_key_env,
        host=getattr(args, "host", None), port=getattr(args, "port", None),
        workers=getattr(args, "workers", None), socket_dir=getattr(args, "socket_dir", None),
        log_level=args.log_level)


def _pinned(args: argparse.Namespace) -> Overrides:
    """The flags, with the config file found at start-up named: a reload reads that
    file again, and is refused if it is gone, rather than fall back to the defaults."""
    overrides = _overrides(args)
    return dataclasses.replace(overrides, config_path=config_file(overrides, os.environ))


def _reload(overrides: Overrides) -> Config:
    """SIGHUP: the same file, flags and environment read again (ConfigError raised).
    The logging settings apply as soon as the new file validates."""
    config = load_config(overrides, os.environ, PROVIDER_TYPES.keys(), reloading=True)
    configure(config.logging)
    return config


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(_overrides(args), os.environ, PROVIDER_TYPES.keys())
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        sys.exit(2)


def _serve(config: Config, words: list[str], worker_index: int | None,
           load: Callable[[], Config]) -> None:
    """One worker serves in this process; with ``workers`` > 1 this process becomes the
    supervisor and each worker is a fresh ``python -m proxy`` with the same arguments
    (and so the same config) plus its ``--worker-index``."""
    count = config.server.workers
    if worker_index is None and count > 1:
        sys.exit(_supervise(config, words))
    if worker_index is not None and not 0 <= worker_index < count:
        print(f"usage error: --worker-index must be between 0 and {count - 1}",
              file=sys.stderr)
        sys.exit(2)
    # Read once and removed: a reload's environment, and anything this process might
    # start, never see it.
    secret = os.environ.pop(PEER_SECRET_ENV, "") if worker_index is not None else ""
    # The supervisor's metrics directory (kept: prometheus-client reads it too).
    shared_metrics = os.environ.get(MULTIPROC_ENV) if worker_index is not None else None
    worker = WorkerSpec.of(config, worker_index or 0, count, secret.encode(),
                           Path(shared_metrics) if shared_metrics else None)
    supervisor = os.getppid() if worker_index is not None else None
    try:
        uvloop.run(serve(config, worker, supervisor_pid=supervisor, load=load))
    except CannotListen as exc:
        log.error("%s", exc)
        sys.exit(EXIT_CANNOT_LISTEN)


def _supervise(config: Config, words: list[str]) -> int:
    """Start the workers once their port is known to be free (else one line and exit
    3, not a crash loop), with the secret that lets them vouch for requests they
    forward to each other (``sharing/peers.py``) in their environment, never on a command line."""
    server = config.server
    try:
        check_port_free(server.host, server.port)
    except CannotListen as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LISTEN
    # Workers always get sockets: they forward a deduplicated request to the worker
    # that owns its key (proxy/sharing/peers.py). Without --socket-dir, a private directory.
    private = None if server.socket_dir else tempfile.mkdtemp(prefix="proxy-")
    extra = ["--socket-dir", private] if private else []

    def command(index: int) -> list[str]:
        return [sys.executable, "-m", "proxy", *words, *extra, "--worker-index", str(index)]

    log.info("supervisor (pid %d): %d workers on %s:%d (SO_REUSEPORT) and unix sockets "
             "in %s", os.getpid(), server.workers, server.host, server.port,
             server.socket_dir or private)
    # Every worker's metrics files, summed by a scrape on any of them: this gateway's
    # own empty directory, never another's (observe/metrics_state.py), gone at exit.
    metrics_dir = Path(tempfile.mkdtemp(prefix="proxy-metrics-"))
    env = {**os.environ, PEER_SECRET_ENV: secrets.token_hex(32),
           MULTIPROC_ENV: str(metrics_dir)}
    env.pop(MULTIPROC_ENV.lower(), None)  # the old spelling, which the library reads too
    try:
        # Workers get their grace period, and a little more to close up.
        return Supervisor(command, server.workers, env=env,
                          stop_timeout=server.shutdown_grace + 5,
                          on_exit=functools.partial(worker_gone, metrics_dir)).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if private:
            shutil.rmtree(private, ignore_errors=True)


async def _discover(given: Config, env: Mapping[str, str]) -> Snapshot:
    """Every provider asked at once; each one's line on stderr as soon as it answered
    (``terminal.Progress``), so a slow provider shows as the one still waited for."""
    async with demo_upstream_if_needed(given) as config:
        client = UpstreamClient(config)
        tasks = BackgroundTasks()
        progress = Progress([p.name for p in config.providers], sys.stderr, env)
        await client.start()
        try:
            catalog = ModelCatalog([build_provider(p) for p in config.providers], client,
                                   tasks, ttl=config.models_cache_ttl,
                                   timeout=config.timeouts.discovery,
                                   on_probe=functools.partial(_show_probe, progress))
            tasks.spawn(progress.spin(), name="progress")
            return await catalog.refresh()
        finally:
            await tasks.close()
            progress.close()
            await client.close()


def _show_probe(progress: Progress, s: ProviderStatus) -> None:
    if s.healthy:
        detail = f"{len(s.models)} models" + (", needs each client's own key"
                                              if s.caller_key else "")
    else:
        detail = s.error or "failed"
    progress.finished(s.provider, s.healthy, f"{detail} ({s.latency_ms:.0f} ms)")


async def _models(config: Config, env: Mapping[str, str], *, as_json: bool) -> int:
    snapshot = await _discover(config, env)
    if as_json:
        print(orjson.dumps({"providers": [_status_json(s) for s in snapshot.statuses]},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        rows: list[tuple[str, ...]] = [("PROVIDER", "MODEL", "STATUS", "LATENCY")]
        for s in snapshot.statuses:
            status = "ok" if s.healthy else f"error: {s.error}"
            for model in s.models or ("-",):
                rows.append((s.provider, model, status, f"{s.latency_ms:.0f} ms"))
        print_table(rows, Style.for_stream(sys.stdout, env), status_column=2)
    return 0 if any(s.healthy for s in snapshot.statuses) else 1


async def _check(config: Config, env: Mapping[str, str]) -> int:
    if not config.providers:  # `serve` would answer from the demo mock: nothing to check
        return _no_providers(config)
    snapshot = await _discover(config, env)
    rows: list[tuple[str, ...]] = [("PROVIDER", "TYPE", "RESULT", "MODELS", "LATENCY")]
    for s in snapshot.statuses:
        result = "ok" if s.healthy else f"FAILED: {s.error}"
        if s.caller_key:  # the drop-in without a key: up, lists with each client's key
            result = "ok (reachable; needs each client's own key)"
        rows.append((s.provider, s.type, result, str(len(s.models)), f"{s.latency_ms:.0f} ms"))
    print_table(rows, Style.for_stream(sys.stdout, env), status_column=2)
    return 0 if all(s.healthy for s in snapshot.statuses) else 1


def _check_offline(config: Config) -> int:
    """``check --offline``: the config loaded (``_load`` already exited 2 on any problem);
    say what it holds, and exit 1 for what cannot work without asking anyone: a
    provider whose key variable is not set. No provider at all is a valid file (the
    one ``proxy init`` writes when it finds none): ``serve`` runs the demo mock."""
    if not config.providers:
        print(f"config ok: {config.source}; no providers: `proxy serve` answers from its "
              "built-in mock upstream until one is named")
        return 0
    rows: list[tuple[str, ...]] = [("PROVIDER", "TYPE", "BASE URL", "CREDENTIALS")]
    for p in config.providers:
        if p.api_key_env is None:
            credentials = "the client's own" if p.forward_client_auth else "none"
        else:
            credentials = f"${p.api_key_env}" + (" NOT SET" if p.api_key_missing else "")
        rows.append((p.name, p.type, p.base_url, credentials))
    print_table(rows)
    keys = len(config.auth.keys)
    print(f"config ok: {config.source}; {len(config.providers)} providers, "
          f"{keys} gateway keys" + ("" if keys else " (open to anyone who can reach it)"))
    return 1 if any(p.api_key_missing for p in config.providers) else 0


def _no_providers(config: Config) -> int:
    print(f"check: no providers configured (config: {config.source}); name them in "
          "a config file, use --upstream URL, or set OPENAI_API_KEY", file=sys.stderr)
    return 1


def _status_json(s: object) -> dict[str, object]:
    fields = ("provider", "type", "healthy", "latency_ms", "models", "error")
    return {name: getattr(s, name) for name in fields}

