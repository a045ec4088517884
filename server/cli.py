"""The ``moeserve`` command line: ``serve`` (the default), ``generate``, ``convert``, ``bench``.

Knows argument parsing and how to wire a loaded model, its tokenizer and the engine together
for a terminal user. ``serve``'s flags are generated from ``server.settings.Settings``, one per
setting; the HTTP server itself lives in ``server/http/app.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from moeserve.devtools.demo import demo_model_dir
from moeserve.models.errors import ModelError
from moeserve.models.loader import load
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.events import DeltaEvent, ErrorEvent, FinishEvent, GenerationRequest
from moeserve.server.engine.sampling import SamplingParams
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.settings import (
    Settings,
    cli_flag,
    env_var,
    load_settings,
    resolve_dtype,
    unknown_env_vars,
)
from moeserve.server.text.tokenizer import Tokenizer

logger = logging.getLogger("moeserve")

_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Options of the top-level parser that take a value; they may precede the subcommand.
_TOP_LEVEL_OPTIONS = ("--log-level",)


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local model directory or Hugging Face repo id (default: the built-in demo model)",
    )
    # The same choices, default and meaning as serve's --dtype.
    dtype = Settings.model_fields["dtype"]
    parser.add_argument(
        "--dtype",
        choices=list(get_args(dtype.annotation)),
        default=dtype.default,
        help=f"{dtype.description} (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="moeserve",
        description="An OpenAI-compatible inference server for Mixture-of-Experts models on "
        "MLX. With no command, moeserve serves (moeserve --port 9000).",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="logging level (default: info; serve: its log_level; bench: warning)",
    )
    sub = parser.add_subparsers(dest="command", title="commands")
    _add_serve_parser(sub)

    gen = sub.add_parser("generate", help="generate from a prompt without HTTP, print tokens/s")
    _model_arg(gen)
    gen.add_argument("--prompt", required=True, help="user message (chat template applied)")
    gen.add_argument("--raw", action="store_true", help="use the prompt as-is, no chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="default: %(default)s")
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)"
    )
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")

    conv = sub.add_parser("convert", help="write a checkpoint in the MLX layout")
    conv.add_argument("src", help="source directory or Hugging Face repo id")
    conv.add_argument("dst", help="output directory (must not exist or be empty)")
    conv.add_argument("--quantize", action="store_true", help="quantize (affine)")
    conv.add_argument("--bits", type=int, default=4, help="default: %(default)s")
    conv.add_argument("--group-size", type=int, default=64, help="default: %(default)s")
    conv.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="cast floating weights (default: as stored)",
    )

    from moeserve.devtools import loadgen

    bench = sub.add_parser(
        "bench", help="load-test any OpenAI-compatible server (streaming chat, C clients)"
    )
    loadgen.add_arguments(bench)
    bench.add_argument(
        "-v", "--verbose", action="store_true", help="log every HTTP request (--log-level info)"
    )
    return parser


def _add_serve_parser(sub: Any) -> None:
    """The ``serve`` subcommand: ``--config`` plus one flag per setting, documented by it."""
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API (the default command)",
        description="Serve the OpenAI-compatible HTTP API. Settings come from "
        "config/server.toml, then MOESERVE_* environment variables, then these flags.",
        # Flags not given stay out of the namespace, so they do not mask lower sources.
        argument_default=argparse.SUPPRESS,
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="settings TOML file (default: $MOESERVE_CONFIG, else the repository's "
        "config/server.toml)",
    )
    for name, info in Settings.model_fields.items():
        flag = cli_flag(name)
        choices = _literal_choices(info.annotation)
        is_list = get_origin(info.annotation) is list
        if is_list:
            shown = f"repeatable; env {env_var(name)}, comma-separated or JSON"
        elif info.default is None:
            shown = f"env {env_var(name)}"
        else:
            shown = f"default: {info.default}; env {env_var(name)}"
        if info.annotation is bool:
            choices = ["true", "false"]
            serve.add_argument(
                "--no-" + flag[2:],
                dest=name,
                action="store_const",
                const="false",
                help=f"same as {flag} false",
            )
        serve.add_argument(
            flag,
            dest=name,
            # Values stay strings: pydantic validates them, so a bad one gets the same
            # one-line message naming the setting as a bad TOML or environment value.
            action="append" if is_list else "store",
            metavar="{" + ",".join(choices) + "}"
            if choices
            else flag[2:].replace("-", "_").upper(),
            help=f"{info.description} [{shown}]".replace("%", "%%"),
        )


def _literal_choices(annotation: Any) -> list[str]:
    """The allowed values of a ``Literal[...]`` setting, else an empty list."""
    return [str(a) for a in get_args(annotation)] if get_origin(annotation) is Literal else []


def _serve(args: argparse.Namespace) -> int:
    """Load the settings, then run the HTTP server until a signal has drained it."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    settings = load_settings(getattr(args, "config", None), **overrides)
    logging.basicConfig(level=settings.log_level.upper(), format=_LOG_FORMAT)
    _warn_unknown_env()
    if settings.distributed is not None:  # started by mlx.launch: every rank joins first
        from moeserve.server.distributed import launch

        if launch.join(settings).rank != 0:
            return launch.run_follower(settings)  # no port: only rank 0 serves HTTP
    from moeserve.server.http.app import (
        create_app,  # imported late: it pulls in FastAPI and the engine
    )

    if settings.model is not None:
        # Fail before uvicorn starts, with one line, for the common mistakes (wrong path or
        # repo id, unsupported architecture); weight problems still surface at load time.
        from moeserve.models.loader import build_model_type, read_json, resolve_model_path

        build_model_type(read_json(resolve_model_path(settings.model) / "config.json"))

    from uvicorn.config import STARTUP_FAILURE

    from moeserve.server.http.drain import CUT_GRACE_SECONDS, DrainingServer

    app = create_app(settings)
    # sse-starlette would cut every stream the moment uvicorn starts its exit; the drain
    # (server/http/drain.py) ends them itself, each with an error event and [DONE].
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # After the drain nothing should be left; this only bounds a request that ignores it.
        timeout_graceful_shutdown=CUT_GRACE_SECONDS,
    )
    server = DrainingServer(config, app.state.drain)
    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT, re-raised after the shutdown
        server.run()
    # Not started: a signal came during startup (uvicorn.run exits with 3 then, too).
    return 0 if server.started else STARTUP_FAILURE


def _warn_unknown_env() -> None:
    """Log a warning for each ``MOESERVE_*`` variable that nothing reads (a misspelling)."""
    for warning in unknown_env_vars(Settings.model_fields):
        logger.warning(warning)


def _with_default_command(argv: Sequence[str] | None) -> list[str]:
    """Insert ``serve`` when no subcommand is given: ``moeserve --port 9000`` serves."""
    args = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(args) and args[i].split("=", 1)[0] in _TOP_LEVEL_OPTIONS:
        i += 1 if "=" in args[i] else 2
    if i > len(args):
        return args  # a top-level option lacks its value: argparse says so
    if i < len(args) and (args[i] in ("-h", "--help") or not args[i].startswith("-")):
        return args  # top-level help, or a subcommand (argparse reports an unknown one)
    return [*args[:i], "serve", *args[i:]]


def _generate(args: argparse.Namespace) -> int:
    _warn_unknown_env()
    loaded = load(args.model or demo_model_dir(), dtype=resolve_dtype(args.dtype))
    tokenizer = Tokenizer.from_dir(loaded.path)
    if args.raw:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = tokenizer.tokenize_chat([{"role": "user", "content": args.prompt}])
    engine = Engine(loaded.model, tokenizer, SchedulerConfig(max_model_len=1 << 20))
    engine.start()
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    request = GenerationRequest(uuid.uuid4().hex, prompt, params)

    async def run() -> tuple[int, float, float]:
        start = time.perf_counter()
        first = None
        tokens = 0
        async for event in engine.generate(request):
            if isinstance(event, DeltaEvent):
                first = first or time.perf_counter()
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, FinishEvent):
                tokens = event.completion_tokens
            elif isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)
        return tokens, start, first or time.perf_counter()

    try:
        tokens, start, first = asyncio.run(run())
    finally:
        engine.shutdown()
    end = time.perf_counter()
    decode_tps = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
    print(
        f"\n--\nprompt: {len(prompt)} tokens, time to first token {first - start:.3f} s; "
        f"generated {tokens} tokens, {decode_tps:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from moeserve.devtools import loadgen

    return loadgen.main(args)


def _convert(args: argparse.Namespace) -> int:
    from moeserve.models.convert import convert

    convert(
        args.src,
        args.dst,
        quantize=args.quantize,
        bits=args.bits,
        group_size=args.group_size,
        dtype=args.dtype,
    )
    print(f"wrote {args.dst}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moeserve`` console script.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    args = build_parser().parse_args(_with_default_command(argv))
    if args.command != "serve":  # serve configures logging once its settings are known
        # httpx logs each of bench's requests at info: too much unless asked for.
        quiet = args.command == "bench" and not args.verbose
        level = args.log_level or ("warning" if quiet else "info")
        logging.basicConfig(level=level.upper(), format=_LOG_FORMAT)
    handlers = {"serve": _serve, "generate": _generate, "convert": _convert, "bench": _bench}
    try:
        code = handlers[args.command](args)
    except (ModelError, FileExistsError, ValueError) as e:
        print(f"moeserve: error: {e}", file=sys.stderr)
        code = 2
    if argv is None and args.command in ("serve", "generate"):
        _exit_process(code)
    return code


def _exit_process(code: int) -> None:
    """End the process now that the engine thread has been joined.

    MLX 0.32 can abort at interpreter exit ("terminate called without an active exception")
    when a thread other than the main one ran MLX work and the process exits right after it
    (ml-explore/mlx#3126). Everything is already shut down and persisted at this point, so
    skip the C++ static destructors; only the real command line does this, never a caller
    that passes ``argv`` (tests).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
