"""The `apix-trio` command line: serve, keygen, token, sub, pub, audit.

Every command returns an exit status instead of exiting: 0 on success, 1
when the work failed (a refused call, a closed connection, an unwritable
file), 2 for bad usage or a bad configuration (argparse's own usage errors
also exit 2). Diagnostics go to stderr, prefixed `apix-trio: `; stdout
carries only the command's product (a token, event lines, a JSON result),
so it can be piped.

The server, configuration, logging and key modules are imported inside the
commands that need them: `apix-trio token` does not load the server, and
`--help` works even when a heavy dependency is broken.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import trio

from apix_trio import __version__

if TYPE_CHECKING:
    from apix_trio.settings import Settings

PROG = "apix-trio"
DEFAULT_URL = "ws://127.0.0.1:8080/ws"
KEY_TYPES = ("rsa", "ec", "ed25519")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `apix-trio` command with `argv` (default: `sys.argv[1:]`) and
    return its exit status (see the module docstring)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return command(args)


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _load_settings(config_path: str | None, flags: dict[str, object]) -> Settings | None:
    """Settings from `config_path`/`APIX_CONFIG`, the environment and `flags`;
    None after printing every problem line."""
    from apix_trio.config import ConfigError, load_settings

    try:
        return load_settings(config_path=config_path, environ=os.environ, flags=flags)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(f"config: {problem}")
        return None


# -- serve ------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    """Validate the configuration, set up logging, run the server until a signal."""
    given = {
        "ws_port": args.ws_port,
        "http_port": args.http_port,
        "redis_url": args.redis_url,
        "workers": args.workers,
    }
    # Flag values stay text: the loader converts and range-checks them like
    # environment values, and names the flag in any problem line.
    flags: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    settings = _load_settings(args.config, flags)
    if settings is None:
        return EXIT_USAGE
    from apix_trio.observability.logs import configure_logging
    from apix_trio.server import run

    configure_logging(settings.log.level, settings.log.format)
    if settings.server.workers > 1 and args.worker_of is None:
        import trio

        from apix_trio.supervisor import supervise

        return trio.run(supervise, settings, _serve_args(args))
    return run(settings, worker_of=args.worker_of)


def _serve_args(args: argparse.Namespace) -> list[str]:
    """The operator's `serve` arguments that workers must see too (the
    supervisor adds `--workers 1` and the resolved ports)."""
    passed = []
    for flag, value in (("--config", args.config), ("--redis-url", args.redis_url)):
        if value is not None:
            passed += [flag, value]
    return passed


# -- keygen -----------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    """Write NAME.key (private, 0600) and NAME.pem (public) into --out; print
    both paths, the kid (NAME) and the JWT algorithm."""
    from apix_trio.auth.devkeys import algorithm_for, generate_keypair, load_private_key

    out = Path(args.out)
    private_path = out / f"{args.name}.key"
    public_path = out / f"{args.name}.pem"
    existing = [str(path) for path in (private_path, public_path) if path.exists()]
    if existing and not args.force:
        _say(f"keygen: {', '.join(existing)} already exist(s); pass --force to replace")
        return EXIT_FAILED
    try:
        out.mkdir(parents=True, exist_ok=True)
        generate_keypair(args.type, private_path, public_path)
        algorithm = algorithm_for(load_private_key(private_path))
    except (OSError, ValueError) as exc:
        _say(f"keygen: {exc}")
        return EXIT_FAILED
    print(f"private key: {private_path}")
    print(f"public key: {public_path}")
    print(f"kid: {args.name}")
    print(f"algorithm: {algorithm}")
    return EXIT_OK


# -- token ------------------------------------------------------------------


def _cmd_token(args: argparse.Namespace) -> int:
    """Print one signed token (and nothing else) on stdout.

    The key is --key, else the development key pair in `auth.dev_key_dir`
    (created when missing, which is reported on stderr). `iss`/`aud` come
    from `auth.issuer`/`auth.audience`, so the token fits the configured
    server.
    """
    from apix_trio.auth.devkeys import ensure_dev_keys, mint_token

    if args.ttl <= 0:
        _say("token: --ttl must be a positive number of seconds")
        return EXIT_USAGE
    settings = _load_settings(args.config, {})
    if settings is None:
        return EXIT_USAGE
    try:
        if args.key is not None:
            key_path = Path(args.key)
        else:
            key_path, _public, created = ensure_dev_keys(settings.auth.dev_key_dir)
            if created:
                _say(f"token: created a development key pair in {key_path.parent}")
        token = mint_token(
            key_path,
            org=args.org,
            sub=args.sub,
            ttl=args.ttl,
            pub=args.pub,
            sub_patterns=args.sub_pattern,
            state=args.state,
            roles=args.role,
            kid=args.kid,
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
        )
    except (OSError, ValueError) as exc:
        _say(f"token: {exc}")
        return EXIT_FAILED
    print(token)
    return EXIT_OK


# -- sub / pub --------------------------------------------------------------


def _token_of(args: argparse.Namespace) -> str | None:
    token: str | None = args.token or os.environ.get("APIX_TOKEN") or None
    if token is None:
        _say(f"{args.command_name}: a token is needed: --token or APIX_TOKEN")
    return token


def _run_client(args: argparse.Namespace, work: Callable[[str], Any]) -> int:
    """Run `work(token)` under trio, turning client errors into exit 1."""
    from apix_trio.clients.client import ApixClientError

    token = _token_of(args)
    if token is None:
        return EXIT_USAGE
    try:
        status: int = trio.run(work, token)
    except ApixClientError as exc:
        _say(f"{args.command_name}: {exc}")
        return EXIT_FAILED
    except trio.TooSlowError:
        _say(f"{args.command_name}: timed out")
        return EXIT_FAILED
    return status


def _cmd_sub(args: argparse.Namespace) -> int:
    """Subscribe to the channels; print every event push as one JSON line on
    stdout until Ctrl-C (exit 0) or until the server closes (exit 1)."""
    from apix_trio.clients.client import open_client

    async def work(token: str) -> int:
        async with open_client(args.url, token) as client:
            for channel in args.channels:
                result = await client.subscribe(channel, since=args.since)
                _say(
                    f"sub: subscribed to {channel} at {result.get('position')}"
                    f" (replayed {result.get('replayed', 0)},"
                    f" recovered {str(result.get('recovered', True)).lower()})"
                )
            async for push in client.pushes():
                line = orjson.dumps(push).decode()
                if push.get("push") == "event":
                    print(line, flush=True)
                else:
                    _say(f"sub: push: {line}")
        return EXIT_OK

    try:
        return _run_client(args, work)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): a normal end.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _cmd_pub(args: argparse.Namespace) -> int:
    """Publish DATA_JSON to the channel; print the result as JSON on stdout."""
    from apix_trio.clients.client import open_client

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        _say(f"pub: DATA_JSON is not valid JSON: {exc}")
        return EXIT_USAGE

    async def work(token: str) -> int:
        with trio.fail_after(args.timeout):
            async with open_client(args.url, token) as client:
                result = await client.publish(args.channel, data, key=args.key)
        print(orjson.dumps(result).decode(), flush=True)
        return EXIT_OK

    try:
        return _run_client(args, work)
    except KeyboardInterrupt:
        return 130


# -- audit ------------------------------------------------------------------


def _cmd_audit(args: argparse.Namespace) -> int:
    """Print an org's audit trail as JSON lines (docs/audit.md).

    From Redis directly (`--redis-url` or `broker.redis_url` of the
    configuration), or with `--url` through a node's HTTP API and an admin
    token (`--token` or APIX_TOKEN; the trail is the token's org).
    """
    import re

    from apix_trio.broker.audit import BadAuditQuery, parse_query
    from apix_trio.clients.audit import (
        AuditReadError,
        open_http_pages,
        open_redis_pages,
        print_trail,
    )

    try:
        query = parse_query(since=args.since, limit=args.limit, type=args.type, sub=args.sub)
    except BadAuditQuery as exc:
        _say(f"audit: {exc}")
        return EXIT_USAGE
    if args.interval <= 0:
        _say("audit: --interval must be a positive number of seconds")
        return EXIT_USAGE
    if args.url is not None:
        token = _token_of(args)
        if token is None:
            return EXIT_USAGE
        source = open_http_pages(args.url, token)
    else:
        if args.org is None or re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", args.org) is None:
            _say("audit: --org ORG is needed (an org name like acme) to read Redis directly")
            return EXIT_USAGE
        flags: dict[str, object] = {}
        if args.redis_url is not None:
            flags["redis_url"] = args.redis_url
        settings = _load_settings(args.config, flags)
        if settings is None:
            return EXIT_USAGE
        if not settings.broker.redis_url:
            _say(
                "audit: no broker.redis_url (--redis-url): the embedded broker's trail lives "
                "in the server process; use --url and --token to read it over HTTP"
            )
            return EXIT_USAGE
        source = open_redis_pages(settings, args.org)

    def emit(line: str) -> None:
        print(line, flush=True)

    async def work() -> int:
        async with source as page:
            await print_trail(page, query, emit=emit, follow=args.follow, interval=args.interval)
        return EXIT_OK

    try:
        return trio.run(work)
    except AuditReadError as exc:
        _say(f"audit: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# -- the parser -------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Real-time WebSocket and event-streaming server on Trio."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server until SIGINT/SIGTERM")
    serve.add_argument("--config", metavar="PATH", help="TOML file (default: $APIX_CONFIG)")
    serve.add_argument("--ws-port", metavar="N", help="server.ws_port (0: pick a free port)")
    serve.add_argument("--http-port", metavar="N", help="server.http_port (0: pick a free port)")
    serve.add_argument("--redis-url", metavar="URL", help="broker.redis_url (empty: embedded)")
    serve.add_argument(
        "--workers",
        metavar="N",
        help="server.workers: processes sharing the ports ('auto': one per core; >1 needs Redis)",
    )
    serve.add_argument("--worker-of", type=int, metavar="PID", help=argparse.SUPPRESS)
    serve.set_defaults(command=_cmd_serve)

    keygen = commands.add_parser("keygen", help="write a JWT signing key pair")
    keygen.add_argument("--type", choices=KEY_TYPES, default="rsa", help="default: rsa (RS256)")
    keygen.add_argument("--out", metavar="DIR", default=".", help="directory (default: .)")
    keygen.add_argument(
        "--name", default="apix", help="file name and kid: NAME.key, NAME.pem (default: apix)"
    )
    keygen.add_argument("--force", action="store_true", help="replace existing files")
    keygen.set_defaults(command=_cmd_keygen)

    token = commands.add_parser("token", help="print a signed token (development key by default)")
    token.add_argument("--org", required=True)
    token.add_argument("--sub", required=True)
    token.add_argument("--pub", metavar="PATTERN", action="append", default=[])
    token.add_argument(
        "--sub-pattern",
        metavar="PATTERN",
        action="append",
        default=[],
        help="a perms.sub pattern (channels the token may subscribe to)",
    )
    token.add_argument("--state", metavar="PATTERN", action="append", default=[])
    token.add_argument("--role", metavar="ROLE", action="append", default=[], help="e.g. admin")
    token.add_argument("--ttl", metavar="SECONDS", type=int, default=3600, help="default: 3600")
    token.add_argument("--kid", help="header kid (default: the key file's name)")
    token.add_argument(
        "--key", metavar="PRIVATE_PEM", help="signing key (default: the development key)"
    )
    token.add_argument("--config", metavar="PATH", help="TOML file (default: $APIX_CONFIG)")
    token.set_defaults(command=_cmd_token)

    url_help = f"server URL (default: $APIX_URL or {DEFAULT_URL})"
    default_url = os.environ.get("APIX_URL") or DEFAULT_URL
    token_help = "token (default: $APIX_TOKEN)"

    sub = commands.add_parser("sub", help="print events of channels as JSON lines")
    sub.add_argument("--url", default=default_url, help=url_help)
    sub.add_argument("--token", help=token_help)
    sub.add_argument("--since", metavar="ID", help='replay events after ID ("0": all retained)')
    sub.add_argument("channels", metavar="CHANNEL", nargs="+")
    sub.set_defaults(command=_cmd_sub, command_name="sub")

    pub = commands.add_parser("pub", help="publish one event and print the result")
    pub.add_argument("--url", default=default_url, help=url_help)
    pub.add_argument("--token", help=token_help)
    pub.add_argument("--key", help="idempotency key")
    pub.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    pub.add_argument("channel", metavar="CHANNEL")
    pub.add_argument("data", metavar="DATA_JSON")
    pub.set_defaults(command=_cmd_pub, command_name="pub")

    audit = commands.add_parser("audit", help="print an org's audit trail as JSON lines")
    audit.add_argument("--org", help="the org (reading Redis directly)")
    audit.add_argument("--follow", action="store_true", help="keep printing new entries")
    audit.add_argument("--type", help="only this type (a trailing * matches a prefix: admin.*)")
    audit.add_argument("--sub", help="only entries of this sub")
    audit.add_argument("--since", metavar="ID", help='entries after ID ("0": from the oldest)')
    audit.add_argument("--limit", metavar="N", help="entries per page, 1-1000 (default 100)")
    audit.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls with --follow"
    )
    audit.add_argument("--redis-url", metavar="URL", help="read Redis directly (broker.redis_url)")
    audit.add_argument("--config", metavar="PATH", help="TOML file (default: $APIX_CONFIG)")
    audit.add_argument("--url", help="read through a node's HTTP API, e.g. http://127.0.0.1:8081")
    audit.add_argument("--token", help="admin token for --url (default: $APIX_TOKEN)")
    audit.set_defaults(command=_cmd_audit, command_name="audit")
    return parser
