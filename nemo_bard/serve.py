"""Serve a BARD model (or an AR Qwen3-VL, for comparison) behind an OpenAI-compatible API.

    python -m nemo_bard.serve --model DIR [--host 127.0.0.1] [--port 8000] [--decoder bard|ar]
        [--max-batch 16] [--max-queue 64] [--max-model-len 4096] [--max-tokens 512]
        [--denoising-steps S] [--confidence-threshold TAU] [--remasking-strategy NAME]
        [--engine static|compiled|eager] [--device cuda|cpu] [--dtype auto]
        [--allowed-local-media-path DIR] [--max-media-bytes N] [--request-timeout 600] [--shutdown-grace 30]
        [--ignore-eos]
    nemo-bard serve --model DIR ...          (the same)

One process serves one model on one device with continuous batching (requests join the running batch at the
next forward). Decoding defaults (denoising steps, remasking strategy, tau) come from the model
directory's ``generation_config.json`` (keys ``denoising_steps``, ``remasking_strategy``,
``confidence_threshold``); the block size is the model's; the flags override them; a request may set
``confidence_threshold``, ``temperature``, ``top_p``, ``top_k`` and ``seed``. Scale out with one server per GPU
behind any HTTP load balancer. SIGTERM stops admitting, lets running requests finish for ``--shutdown-grace``
seconds (then cancels them) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from nemo_bard.errors import UserError, report
from nemo_bard.generation.defaults import DefaultsError, read_decoding_defaults
from nemo_bard.generation.points import ENGINES, REMASKING_STRATEGIES
from nemo_bard.models.loading import DTYPES
from nemo_bard.models.paths import ModelPathError, read_model_config


class ServeError(UserError):
    """A bad server option; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a bard_vl checkpoint directory (with --decoder ar: a Qwen3-VL one)")
    ap.add_argument("--decoder", choices=("bard", "ar"), default=None,
                    help="bard (block diffusion; default for bard_vl directories) or ar (one token per forward)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: directory name)")
    ap.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row at most (more: HTTP 429)")
    ap.add_argument("--max-model-len", type=int, default=4096, help="prompt + answer tokens per request at most")
    ap.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of a request that sets none")
    ap.add_argument("--denoising-steps", type=int, default=None)
    ap.add_argument("--confidence-threshold", type=float, default=None)
    ap.add_argument("--remasking-strategy", choices=REMASKING_STRATEGIES, default=None)
    ap.add_argument("--engine", choices=ENGINES, default="static")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--allowed-local-media-path", default=None,
                    help="image_url / video_url may name local files under this directory (default: data URLs only)")
    ap.add_argument("--max-media-bytes", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds from arrival (0: none)")
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds running requests may finish after SIGTERM before they are cancelled")
    ap.add_argument("--stream-prefix", action="store_true",
                    help="stream each block's decided leading tokens after every forward, not only whole blocks (the "
                         "first tokens sooner on long blocks; one more host sync per forward: -17%% tokens/s at "
                         "concurrency 1 on the CPU demo)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="benchmarking: no stop tokens, every request decodes to its max_tokens")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 can be faster for small models on a small CPU)")
    ap.add_argument("--log-level", default="info")
    return ap


def check_args(args: argparse.Namespace) -> dict:
    """Validate options before any heavy import; returns the model's config.json."""
    try:
        cfg = read_model_config(args.model, "--model", "pass a model directory")
    except ModelPathError as exc:
        raise ServeError(str(exc)) from None
    if cfg is None:
        raise ServeError(f"--model {args.model}: no such directory; pass a local model directory")
    mtype = cfg.get("model_type")
    if args.decoder is None:
        args.decoder = "bard" if mtype == "bard_vl" else "ar"
    if args.decoder == "bard" and mtype != "bard_vl":
        raise ServeError(f"--model {args.model}: model_type {mtype!r} is not bard_vl; convert it first "
                         "(python -m nemo_bard.convert) or serve it with --decoder ar")
    for flag in ("max_batch", "max_queue", "max_model_len", "max_tokens", "max_media_bytes"):
        if getattr(args, flag) < 1:
            raise ServeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.confidence_threshold is not None and not 0.0 <= args.confidence_threshold <= 1.0:
        raise ServeError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if args.denoising_steps is not None and args.denoising_steps < 1:
        raise ServeError(f"--denoising-steps must be >= 1, got {args.denoising_steps}")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in [0, 65535], got {args.port}")
    if args.decoder == "bard":
        try:
            read_decoding_defaults(args.model)  # a bad stored default is one line now, not after the model loads
        except DefaultsError as exc:
            raise ServeError(str(exc)) from None
    media = args.allowed_local_media_path
    if media is not None and not Path(media).is_dir():
        raise ServeError(f"--allowed-local-media-path {media}: not a directory")
    check_port(args.host, args.port)
    return cfg


def check_port(host: str, port: int) -> None:
    """Refuse a --host/--port that cannot be bound before the model loads (one line, not uvicorn's late error)."""
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another --port "
                         "or stop the process that holds it") from None


def decoding_defaults(model: Any, args: argparse.Namespace) -> tuple[int, int, str, float]:
    """(block size, denoising steps, remasking strategy, tau): each flag, else the model directory's
    ``generation_config.json`` (:mod:`nemo_bard.generation.defaults`), else B, dynamic, 0.9."""
    block = int(model.config.block_size)
    steps, strategy, tau = read_decoding_defaults(args.model).resolve(
        block, args.denoising_steps, args.remasking_strategy, args.confidence_threshold)
    return block, steps, strategy, tau


def build_server(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and build ``(app, scheduler)`` (the scheduler is not started)."""
    # the model and server stacks (torch, transformers, FastAPI: ~9 s) load once the arguments, files and port
    # are checked
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration

    import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)
    from nemo_bard.generation.decode import stop_ids
    from nemo_bard.generation.engine import DecodeEngine, batch_bucket
    from nemo_bard.generation.inputs import build_inputs
    from nemo_bard.generation.sampling import step_schedule
    from nemo_bard.generation.session import ARSession, BlockDiffusionSession
    from nemo_bard.models.loading import resolve_device_dtype
    from nemo_bard.serving.app import Metrics, ServerConfig, create_app
    from nemo_bard.serving.protocol import MediaPolicy
    from nemo_bard.serving.scheduler import Scheduler

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    if args.threads:
        import torch  # see the imports above

        torch.set_num_threads(args.threads)
    cls = AutoModelForImageTextToText if args.decoder == "bard" else Qwen3VLForConditionalGeneration
    model = cls.from_pretrained(args.model, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    engine = DecodeEngine.for_model(model, args.engine)
    try:
        engine.check_positions(args.max_model_len)
    except ValueError as exc:
        raise ServeError(str(exc).replace("prompt + --max-new-tokens", "--max-model-len")
                         .replace("lower --max-new-tokens", "lower --max-model-len")) from None
    capacity = engine.capacity_for(args.max_model_len)
    stops = stop_ids(model, processor.tokenizer)
    pad = processor.tokenizer.pad_token_id
    pad = (stops[0] if stops else 0) if pad is None else int(pad)
    if args.ignore_eos:
        stops = []
    rows = batch_bucket(args.max_batch)
    if args.decoder == "bard":
        block, steps, strategy, tau = decoding_defaults(model, args)
        mask_id = int(model.config.mask_token_id)

        def make_session() -> Any:
            return BlockDiffusionSession(engine, rows=rows, capacity=capacity, block_size=block,
                                         schedule=step_schedule(block, steps), mask_token_id=mask_id, stops=stops,
                                         pad=pad, strategy=strategy, threshold=tau,
                                         stream_prefix=args.stream_prefix)
        logging.getLogger(__name__).info("decoding: B%d S%d %s tau %g, %d rows x %d slots", block, steps, strategy,
                                         tau, rows, capacity)
    else:
        block = 1

        def make_session() -> Any:
            return ARSession(engine, rows=rows, capacity=capacity, stops=stops, pad=pad)

    metrics = Metrics()
    scheduler = Scheduler(make_session, max_queue=args.max_queue, metrics=metrics)
    media = MediaPolicy(Path(args.allowed_local_media_path).resolve() if args.allowed_local_media_path else None,
                        args.max_media_bytes)
    config = ServerConfig(model_name=args.served_model_name or Path(args.model).resolve().name, capacity=capacity,
                          block_size=block, default_max_tokens=args.max_tokens, media=media,
                          request_timeout=args.request_timeout or None, decoder=args.decoder)
    app = create_app(scheduler, processor, config, metrics, lambda proc, chat: build_inputs(proc, [chat]))
    app.state.model = model  # the engine holds the model weakly
    return app, scheduler


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; returns 0 after a clean drain."""
    # see build_server
    import uvicorn

    app, scheduler = build_server(args)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # stop admitting at once, then uvicorn's own shutdown
            scheduler.drain(args.shutdown_grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its shutdown (the process would die of SIGTERM); a drained server
            # exits 0 instead, as the docstring promises
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    scheduler.start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(args.shutdown_grace) + 5,
                            timeout_keep_alive=75)  # > a load balancer's idle timeout, so it closes first
    server = Server(config)
    server.run()
    scheduler.drain(args.shutdown_grace)
    scheduler.join(args.shutdown_grace + 10)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; usage errors are one line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except (UserError, KeyboardInterrupt) as exc:
        return report("nemo_bard.serve", exc)


if __name__ == "__main__":
    sys.exit(main())
