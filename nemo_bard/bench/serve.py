"""Serving benchmark: a BARD server and an AR server side by side under closed-loop load.

    python -m nemo_bard.bench.serve --model BARD_DIR --ar-model AR_DIR [--data DATASET [--root-dir DIR]]
        [--concurrency 1,4,16] [--requests 32 | --duration S] [--max-tokens 32] [--servers bard,ar]
        [--threshold TAU] [--steps S] [--strategy low_confidence_static] [--ignore-eos]
        [--preset qwen3vl_2b] [--device cuda|cpu] [--dtype auto] [--engine static] [--max-model-len 1024]
        [--json OUT] [--plot OUT.png]

Both servers are real ``python -m nemo_bard.serve`` processes on 127.0.0.1 (the AR one with ``--decoder ar``).
At every concurrency level ``C``, ``C`` clients send streamed chat requests back to back (a closed loop; the
prompts cycle through ``--data``'s rows, or synthetic image prompts), first to the BARD server, then to the AR
server, so both see the same prompts in the same conditions. Per server and level it reports requests/s, output
tokens/s, decode tokens/s per request (from the end of its prompt prefill to its last token, as the server
reports it; prefill excluded, as in the demo's "decode" columns), time to first token and latency (p50 / p99),
tokens per forward, failed requests, the server's resident memory, and exact match where the data has answers.
``--preset`` builds random-weight models of a real shape (``nemo_bard.bench.presets``; use ``--ignore-eos`` and
a static strategy to force a fixed number of tokens per forward). Without models or a preset, the tiny test
models are built. Output: a table, ``--json`` and a throughput-vs-latency ``--plot``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from nemo_bard.bench.decode import PROMPTS, synthetic_image, tiny_models
from nemo_bard.bench.presets import build_preset
from nemo_bard.data.media import load_image
from nemo_bard.eval.evaluation import load_samples
from nemo_bard.eval.metrics import exact_match, wilson_interval
from nemo_bard.models.loading import resolve_device_dtype


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """``python -m nemo_bard.serve`` in a subprocess on a free loopback port (stopped with SIGTERM)."""

    def __init__(self, model: str, flags: list[str], log: Path, start_timeout: float = 600.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nemo_bard.serve", "--model", model, "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning", *flags],
            stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"nemo_bard.bench.serve: the server for {model} did not start; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        self.name = httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"][0]["id"]

    @property
    def rss_mb(self) -> float | None:
        return _rss_mb(self.proc.pid)

    def stop(self) -> int | None:
        """SIGTERM, then the exit code (None if it had to be killed)."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            code = self.proc.returncode
        self._out.close()
        return code


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_messages(turns: list[dict]) -> list[dict]:
    """Chat turns with loaded images (a dataset row's prompt) as OpenAI messages with data URLs."""
    out = []
    for turn in turns:
        content = turn["content"]
        if isinstance(content, str):
            out.append({"role": turn["role"], "content": content})
            continue
        parts = []
        for item in content:
            if item.get("type") == "text":
                parts.append({"type": "text", "text": item["text"]})
            elif item.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": _data_url(load_image(item["image"]))}})
            else:
                raise SystemExit(f"nemo_bard.bench.serve: {item.get('type')} items are not supported in --data")
        out.append({"role": turn["role"], "content": parts})
    return out


def load_prompts(data: str | None, root_dir: str | None, limit: int) -> list[tuple[list[dict], str | None]]:
    """``[(messages, reference or None)]`` from a chat dataset, or synthetic image prompts."""
    if data:
        samples = load_samples(data, root_dir, limit=limit)
        if not samples:
            raise SystemExit(f"nemo_bard.bench.serve: --data {data} has no rows")
        return [(openai_messages(s.prompt), s.reference) for s in samples]

    return [(openai_messages([{"role": "user", "content": [{"type": "image", "image": synthetic_image(10 * i + j)}
                                                           for j in range(n)] + [{"type": "text", "text": text}]}]),
             None) for i, (text, n) in enumerate(PROMPTS)]


async def one_request(client: Any, url: str, model: str, messages: list[dict], max_tokens: int,
                      extra: dict) -> dict:
    """One streamed request; its timings, tokens, forwards and text (or its error)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, **extra}
    t0 = time.perf_counter()
    rec: dict = {"start": t0, "first": None, "tokens": 0, "first_tokens": 0, "text": "", "forwards": None,
                 "decode_s": None, "error": None}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    rec["error"] = obj["error"]["message"]
                if obj.get("choices"):
                    delta = obj["choices"][0]["delta"]
                    ids = delta.get("token_ids") or []
                    if ids and rec["first"] is None:
                        rec["first"], rec["first_tokens"] = time.perf_counter(), len(ids)
                    rec["tokens"] += len(ids)
                    rec["text"] += delta.get("content") or ""
                if obj.get("usage"):
                    usage = obj["usage"]
                    rec["forwards"] = usage.get("forwards")
                    rec["decode_s"] = usage["decode_ms"] / 1000 if usage.get("decode_ms") is not None else None
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["end"] = time.perf_counter()
    return rec


async def closed_loop(url: str, model: str, prompts: list, concurrency: int, requests: int | None,
                      duration: float | None, max_tokens: int, extra: dict, timeout: float) -> tuple[list, float]:
    """``concurrency`` clients sending requests back to back until ``requests`` are done (or ``duration``
    seconds passed); returns the records (with each prompt's index) and the wall time."""
    counter = iter(range(10**9))
    records: list = []
    t0 = time.perf_counter()

    def more() -> int | None:
        i = next(counter)
        if requests is not None and i >= requests:
            return None
        if duration is not None and time.perf_counter() - t0 > duration:
            return None
        return i

    async def client_loop(client: Any) -> None:
        while (i := more()) is not None:
            messages, _ = prompts[i % len(prompts)]
            rec = await one_request(client, url, model, messages, max_tokens, extra)
            rec["prompt"] = i % len(prompts)
            records.append(rec)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return records, time.perf_counter() - t0


def summarize(records: list[dict], wall: float, prompts: list) -> dict:
    """Per-level statistics of one server (see the module docstring)."""
    ok = [r for r in records if r["error"] is None and r["first"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = np.array([r["first"] - r["start"] for r in ok]) if ok else np.array([float("nan")])
    lat = np.array([r["end"] - r["start"] for r in ok]) if ok else np.array([float("nan")])
    after = sum(r["tokens"] - r["first_tokens"] for r in ok)
    after_s = sum(r["end"] - r["first"] for r in ok)
    timed = [r for r in ok if r.get("decode_s")]
    forwards = [r["forwards"] for r in ok if r["forwards"]]
    out = {
        "requests": len(records), "failed": len(records) - len(ok), "wall_s": round(wall, 3),
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": tokens / wall,
        # per request, from the end of its prompt prefill to its last token (server-side clock)
        "decode_tokens_per_s_per_request": (sum(r["tokens"] for r in timed) / sum(r["decode_s"] for r in timed)
                                            if timed else float("nan")),
        # per request, client side, after the first streamed tokens (a one-block answer has none)
        "after_first_tokens_per_s_per_request": after / after_s if after_s > 0 else float("nan"),
        "ttft_p50_ms": 1000 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1000 * float(np.percentile(ttft, 99)),
        "latency_p50_ms": 1000 * float(np.percentile(lat, 50)), "latency_p99_ms": 1000 * float(np.percentile(lat, 99)),
        "tokens_per_forward": tokens / sum(forwards) if forwards else float("nan"),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
    }
    refs = [(r, prompts[r["prompt"]][1]) for r in ok if prompts[r["prompt"]][1] is not None]
    if refs:
        hits = sum(exact_match(r["text"], ref) for r, ref in refs)
        out["exact_match"] = hits / len(refs)
        out["exact_match_ci95"] = list(wilson_interval(int(hits), len(refs)))
    return out


def write_plot(report: dict, path: Path) -> None:
    """Output tokens/s against p50 latency per server, one point per concurrency level."""
    # optional dependency (the [demo] extra); ~1.1 s to import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for server in ("bard", "ar"):
        rows = [r for r in report["levels"] if r["server"] == server]
        xs, ys = [r["latency_p50_ms"] for r in rows], [r["output_tokens_per_s"] for r in rows]
        ax.plot(xs, ys, marker="o", label=f"{server.upper()} server")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"c={r['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(report.get("title", "nemo-bard serving"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(report: dict) -> str:
    head = ("| server | concurrency | req/s | out tok/s | decode tok/s per request | TTFT p50 / p99 ms "
            "| latency p50 / p99 ms | TPF | exact match | failed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in report["levels"]:
        em = f"{100 * r['exact_match']:.1f} %" if "exact_match" in r else "-"
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} "
                     f"| {r['decode_tokens_per_s_per_request']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
                     f"| {r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f} | {r['tokens_per_forward']:.2f} | {em} "
                     f"| {r['failed']} |")
    return head + "\n".join(lines)


def _preset_dirs(args: argparse.Namespace, root: Path) -> tuple[str, str]:
    """Write the preset's random AR and BARD models (and processor) to ``root``."""
    _, dtype = resolve_device_dtype(args.device, args.dtype)
    ar, bard, processor = build_preset(args.preset, "cpu", dtype, args.block_size)
    for name, model in (("ar", ar), ("bard", bard)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return str(root / "bard"), str(root / "ar")


def run(args: argparse.Namespace) -> dict:
    """Start both servers, run every level on each, stop them; returns the report."""
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("nemo_bard.bench.serve: --concurrency lists positive integers, e.g. 1,4,16")
    tmp = tempfile.TemporaryDirectory(prefix="bard_bench_serve_")
    root = Path(tmp.name)
    if args.preset:
        args.model, args.ar_model = _preset_dirs(args, root)
    elif args.model is None or args.ar_model is None:
        bard, ar = tiny_models(root, 4)
        args.model, args.ar_model = str(bard), str(ar)
    prompts = load_prompts(args.data, args.root_dir, args.limit)
    common = ["--max-batch", str(max(levels)), "--max-queue", str(4 * max(levels)), "--engine", args.engine,
              "--max-model-len", str(args.max_model_len)] + (["--threads", str(args.threads)] if args.threads else []) + [
              "--dtype", args.dtype] + (["--device", args.device] if args.device else []) + (
              ["--ignore-eos"] if args.ignore_eos else [])
    bard_flags = list(common)
    for flag, value in (("--confidence-threshold", args.threshold), ("--denoising-steps", args.steps),
                        ("--remasking-strategy", args.strategy)):
        if value is not None:
            bard_flags += [flag, str(value)]
    logs = Path(args.json).parent if args.json else root
    logs.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not wanted or set(wanted) - {"bard", "ar"}:
        raise SystemExit("nemo_bard.bench.serve: --servers lists bard and/or ar")
    flags = {"bard": (args.model, bard_flags), "ar": (args.ar_model, ["--decoder", "ar", *common])}
    servers = {name: ServerProcess(flags[name][0], flags[name][1], logs / f"bench_serve_{name}.log")
               for name in ("bard", "ar") if name in wanted}
    report: dict = {"bard_model": args.model, "ar_model": args.ar_model, "data": args.data, "levels": [],
                    "max_tokens": args.max_tokens, "prompts": len(prompts), "device": args.device or "auto",
                    "title": args.title}
    try:
        for name, srv in servers.items():  # warm-up: buffers, first-call costs
            asyncio.run(closed_loop(srv.url, srv.name, prompts, 2, 4, None, args.max_tokens, {}, args.timeout))
            report[f"{name}_rss_mb_after_warmup"] = srv.rss_mb
        for c in levels:
            for name, srv in servers.items():
                n = None if args.duration else max(args.requests, 2 * c)
                samples: list[tuple[float, float | None]] = []  # (seconds into the level, server RSS MB)
                stop = threading.Event()
                t0 = time.perf_counter()

                def sample(srv: ServerProcess = srv) -> None:
                    while not stop.wait(args.rss_every):
                        samples.append((round(time.perf_counter() - t0, 1), srv.rss_mb))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    records, wall = asyncio.run(closed_loop(srv.url, srv.name, prompts, c, n, args.duration,
                                                            args.max_tokens, {}, args.timeout))
                finally:
                    stop.set()
                    sampler.join()
                row = {"server": name, "concurrency": c, **summarize(records, wall, prompts), "rss_mb": srv.rss_mb,
                       "rss_mb_samples": samples}
                report["levels"].append(row)
                print(f"  {name} c={c}: {row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                      f"failed {row['failed']}", flush=True)
    finally:
        report["exit_codes"] = {name: srv.stop() for name, srv in servers.items()}
        tmp.cleanup()
    by = {(r["server"], r["concurrency"]): r for r in report["levels"]}
    if len(servers) < 2:
        report["ratios"], report["ar_catches_up_at"] = [], None
        return report
    report["ratios"] = [{
        "concurrency": c,
        "output_tokens_per_s_bard_over_ar": by["bard", c]["output_tokens_per_s"] / by["ar", c]["output_tokens_per_s"],
        "decode_tokens_per_s_per_request_bard_over_ar": by["bard", c]["decode_tokens_per_s_per_request"]
        / by["ar", c]["decode_tokens_per_s_per_request"],
    } for c in levels]
    report["ar_catches_up_at"] = next((c for c in levels if by["ar", c]["output_tokens_per_s"]
                                       >= by["bard", c]["output_tokens_per_s"]), None)
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bard_vl directory (default: the tiny test model)")
    ap.add_argument("--ar-model", default=None, help="AR Qwen3-VL directory")
    ap.add_argument("--preset", default=None, help="qwen3vl_2b, qwen3vl_4b, qwen3vl_8b: random-weight models")
    ap.add_argument("--block-size", type=int, default=32, help="block size of --preset models")
    ap.add_argument("--data", default=None, help="chat dataset (save_to_disk dir or JSONL); default: synthetic")
    ap.add_argument("--root-dir", default=None)
    ap.add_argument("--limit", type=int, default=1000, help="dataset rows at most")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--servers", default="bard,ar", help="which servers to run (e.g. bard alone for a soak run)")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level instead of --requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024, help="the servers' --max-model-len")
    ap.add_argument("--threads", type=int, default=None, help="the servers' torch CPU threads")
    ap.add_argument("--threshold", type=float, default=None, help="the BARD server's tau")
    ap.add_argument("--steps", type=int, default=None, help="the BARD server's denoising steps")
    ap.add_argument("--strategy", default=None, help="the BARD server's remasking strategy")
    ap.add_argument("--ignore-eos", action="store_true", help="decode every request to --max-tokens")
    ap.add_argument("--engine", default="static")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    ap.add_argument("--rss-every", type=float, default=10.0, help="seconds between samples of the servers' memory")
    ap.add_argument("--title", default="nemo-bard serving: BARD vs AR server")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print(table(report))
    for r in report["ratios"]:
        print(f"c={r['concurrency']}: BARD/AR output tokens/s {r['output_tokens_per_s_bard_over_ar']:.2f}x, "
              f"decode tokens/s per request {r['decode_tokens_per_s_per_request_bard_over_ar']:.2f}x")
    if report["ratios"]:
        print(f"AR catches up with BARD at concurrency: {report['ar_catches_up_at'] or 'not within the levels run'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
