"""Running `gru-deploy serve`: listen (REST, and gRPC where asked), load the models off the
event loop while health answers not ready, serve until SIGINT/SIGTERM, drain. The pieces it
assembles (server.Service and the REST app, sequences, grpc_front) import nothing of this."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

from gru_deploy.serve.server import Limits, Model, Service, load_models, make_app


def serve(path: Path, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_batch: int | None = None, max_delay_ms: float | None = None, threads: int = 1,
          limits: Limits | None = None, print_fn: Any = print, precision: str = "fp32", group_by_length: bool = True,
          grpc_port: int | None = None, max_sequences: int = 1024, sequence_idle_s: float | None = None) -> None:
    """Run the server (REST on `port`, gRPC on `grpc_port` too when given) until SIGINT/SIGTERM;
    in-flight requests finish before it exits. Every ONNX model of `precision` the export or
    bundle lists is served under its Triton name with its config.pbtxt (serve.repository);
    `max_batch`, `max_delay_ms` and `sequence_idle_s` override the configs' values, and
    `model_name` their names' base. `group_by_length=False` runs each collected group as one
    call padded to its longest request. Sequences are served where the export has a stream
    variant: at most `max_sequences` live."""
    from gru_deploy.serve.repository import read_repository
    from gru_deploy.serve.sequences import load_sequence_model

    def load() -> tuple[Any, list[Model], Any]:
        repository = read_repository(Path(path), precision)  # a bundle archive is extracted and checked once
        models = load_models(repository, threads, max_batch, max_delay_ms, model_name, group_by_length)
        sequences = load_sequence_model(repository, models[0], threads, max_batch, max_delay_ms, precision,
                                        max_sequences, sequence_idle_s, model_name)
        return repository, models, sequences

    # listening while the models load: health answers (ready: false), model calls get 503
    asyncio.run(_run(Service((), None, limits), host, port, grpc_port, print_fn, path, load,
                     "" if group_by_length else ", no grouping by length"))


def log_to_stderr() -> None:
    """The server's own log lines (gru_deploy.*: refused requests at info level, failures) on
    stderr, where the application has not set up logging itself."""
    import sys

    logger = logging.getLogger("gru_deploy")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


async def _run(service: Service, host: str, port: int, grpc_port: int | None, print_fn: Any, path: Path,
               load: Callable[[], tuple[Any, list[Model], Any]], grouping: str = "") -> None:
    """Listen (REST, and gRPC where asked), load the models off the event loop (not ready until
    then), serve until SIGINT/SIGTERM, then drain. Why one piece: the listeners, the loading and
    the drain share one try/finally that closes what was opened, in order."""
    import signal

    from aiohttp import web

    from gru_deploy.errors import UserInputError

    log_to_stderr()
    runner = web.AppRunner(make_app(service, manage=False), handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()
    grpc_server = None
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise UserInputError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
        where = f"http://{host}:{port}"
        if grpc_port is not None:
            from gru_deploy.serve.grpc_front import start_grpc

            grpc_server, bound = await start_grpc(service, host, grpc_port)
            where += f" and grpc {host}:{bound}"
        repository, models, sequences = await asyncio.get_running_loop().run_in_executor(None, load)
        service.install(models, sequences)
        await service.start()
        settings = ", ".join(f"{m.name}: max batch {m.max_batch}, max delay {m.max_delay * 1000:g} ms"
                             for m in models) + grouping
        served = ", ".join(f"{m.name} ({m.file})" for m in service.stateless)
        print_fn(f"serving {served}, {service.model.precision}, from {path} on {where} ({settings})"
                 + (f"; sequences as {sequences.name} ({sequences.file}; at most {sequences.max_sequences} live, "
                    f"freed after {sequences.idle_s:g} s idle)" if sequences is not None else
                    "; no sequences (the export has no stream variant)")
                 + "".join(f"; not served here, left to Triton: {m}" for m in repository.left) + "; Ctrl-C stops")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await service.drain(10.0)  # not ready from here; requests in flight finish first
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=10.0)  # in-flight calls finish first
        await runner.cleanup()  # as do in-flight REST requests
        await service.stop()
