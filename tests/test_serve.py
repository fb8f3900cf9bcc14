"""The OpenAI-compatible server: the official ``openai`` client against a real server on a loopback port,
continuous batching that leaves each request's tokens unchanged, every refusal as one HTTP error, SIGTERM drain.

Servers bind 127.0.0.1 on a free port, every request loop is bounded, and every server stops itself.
"""

from __future__ import annotations

import base64
import concurrent.futures as futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from nemo_bard.generation import ar_generate, block_diffusion_generate  # noqa: E402
from nemo_bard.generation.decode import stop_ids  # noqa: E402
from nemo_bard.generation.inputs import build_inputs, user_conversation  # noqa: E402
from nemo_bard.serve import build_parser, build_server, check_args  # noqa: E402
from tests.conftest import random_image  # noqa: E402

DYNAMIC = "low_confidence_dynamic"


@contextmanager
def running_server(model_dir: Path, *flags: str):
    """An in-process server (uvicorn in a thread) on 127.0.0.1 and a free port; stopped on exit."""
    args = build_parser().parse_args(["--model", str(model_dir), "--device", "cpu", "--log-level", "warning",
                                      *flags])
    check_args(args)
    app, scheduler = build_server(args)
    scheduler.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield SimpleNamespace(url=url, client=client, scheduler=scheduler, app=app, name=Path(model_dir).name)
    finally:
        server.should_exit = True
        thread.join(15)
        scheduler.stop()


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(text: str, image=None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": png_data_url(image)}}] if image is not None else [])
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def sharp_dir(tiny_bard_dir, tmp_path_factory):
    """The tiny bard_vl model with a 30x lm_head saved as a directory: peaked confidences, so tau commits
    several tokens per step and rows finish blocks at different steps."""
    import shutil

    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("sharp") / "sharp"
    shutil.copytree(tiny_bard_dir, out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharp(sharp_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(sharp_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(sharp_dir)


REQUESTS = [  # (text, image seed or None, max_tokens, extra request fields)
    ("hello", None, 23, {}),
    ("Read the digits.", 1, 17, {}),
    ("Describe the image.", 2, 30, {"confidence_threshold": 0.5}),
    ("What is the number? 12 + 7", None, 9, {}),
    ("a b c d e f g h", 3, 26, {"confidence_threshold": 0.3}),
    ("Count the red squares.", None, 14, {"temperature": 1.0, "seed": 7}),
    ("yes", 4, 21, {}),
]


def solo(model, processor, text, seed, max_tokens, extra) -> list[int]:
    """The request decoded alone by block_diffusion_generate (the server's decoding point: B4 S4 dynamic)."""
    images = [random_image(seed)] if seed is not None else []
    enc = build_inputs(processor, [user_conversation(text, images)])
    out = block_diffusion_generate(model, **enc, max_new_tokens=max_tokens, block_size=4, denoising_steps=4,
                                   remasking_strategy=DYNAMIC, confidence_threshold=extra.get("confidence_threshold",
                                                                                              0.9),
                                   temperature=extra.get("temperature", 0.0), seed=extra.get("seed"),
                                   eos_token_id=stop_ids(model, processor.tokenizer))
    return out.sequences[0, : out.lengths[0]].tolist()


def test_concurrent_requests_equal_each_alone(sharp_dir, sharp, monkeypatch):
    """Requests arriving while others decode join the running batch, and each one's tokens
    (fp32, CPU; greedy and seeded sampling) equal a solo generate call's, whatever runs beside it.
    The processor runs on one thread of its own, however many requests arrive together."""
    import nemo_bard.generation.inputs as inputs_module

    model, processor = sharp
    want = [solo(model, processor, *r) for r in REQUESTS]
    threads: set[str] = set()
    real_build = inputs_module.build_inputs

    def recording_build(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(inputs_module, "build_inputs", recording_build)
    assert len({len(w) for w in want}) > 3  # the rows end at different points
    with running_server(sharp_dir, "--max-batch", "4", "--max-queue", "16") as srv:
        joined: list[int] = []
        session = srv.scheduler.session
        add = session.add

        def recording_add(requests, inputs):  # how many rows were running when a request joined
            joined.append(session.running)
            return add(requests, inputs)

        session.add = recording_add

        def call(i: int):
            text, seed, max_tokens, extra = REQUESTS[i]
            time.sleep(0.005 * i)  # staggered arrivals, while the first ones decode
            r = srv.client.chat.completions.create(
                model=srv.name, messages=user_message(text, random_image(seed) if seed is not None else None),
                max_tokens=max_tokens, extra_body={"return_token_ids": True, **extra})
            return r.choices[0].model_extra["token_ids"], r

        for _ in range(2):  # twice: different interleavings, same answers
            with futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
                got = list(pool.map(call, range(len(REQUESTS))))
            for (ids, r), w, (_, _, max_tokens, _) in zip(got, want, REQUESTS):
                assert ids == w
                assert r.usage.completion_tokens == len(w)
                assert r.choices[0].finish_reason == ("length" if len(w) == max_tokens else "stop")
                assert r.usage.model_extra["forwards"] >= 1
        assert max(joined) >= 1  # some request joined a batch that was already decoding
    assert threads == {"nemo-bard-processor_0"}, threads


def test_openai_client_streams_one_chunk_per_block_and_matches_the_full_answer(sharp_dir):
    with running_server(sharp_dir) as srv:
        kw = dict(model=srv.name, messages=user_message("Describe the image.", random_image(2)), max_tokens=30,
                  extra_body={"return_token_ids": True, "confidence_threshold": 0.5})
        full = srv.client.chat.completions.create(**kw)
        chunks = list(srv.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    ids = full.choices[0].model_extra["token_ids"]
    blocks = [c.choices[0].delta.model_extra["token_ids"] for c in chunks
              if c.choices and "token_ids" in (c.choices[0].delta.model_extra or {})]
    assert sum(blocks, []) == ids and len(blocks) == -(-len(ids) // 4)  # one event per committed block of 4
    assert all(len(b) == 4 for b in blocks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == len(ids) == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens > 0
    assert usage.model_extra["tokens_per_forward"] == pytest.approx(len(ids) / usage.model_extra["forwards"], abs=1e-3)
    assert usage.model_extra["tokens_per_forward"] > 1.0  # tau 0.5 on the sharp model: several tokens per forward



def test_stream_prefix_sends_decided_tokens_before_their_block_ends(sharp_dir):
    """``--stream-prefix``: each forward's newly decided leading tokens of a block go out at once; same answer."""
    with running_server(sharp_dir, "--stream-prefix") as srv:
        kw = dict(model=srv.name, messages=user_message("Describe the image.", random_image(2)), max_tokens=30,
                  extra_body={"return_token_ids": True, "confidence_threshold": 0.5})
        full = srv.client.chat.completions.create(**kw)
        chunks = list(srv.client.chat.completions.create(**kw, stream=True))
    ids = full.choices[0].model_extra["token_ids"]
    events = [c.choices[0].delta.model_extra["token_ids"] for c in chunks
              if c.choices and "token_ids" in (c.choices[0].delta.model_extra or {})]
    assert sum(events, []) == ids
    ends = [sum(len(e) for e in events[: i + 1]) for i in range(len(events))]
    assert all((end - len(e)) // 4 == (end - 1) // 4 for e, end in zip(events, ends))  # no event spans two blocks
    assert len(events) > -(-len(ids) // 4)  # some blocks of 4 went out in parts, before they were complete

def test_every_bad_request_is_one_clear_http_error_and_the_server_goes_on(sharp_dir, tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    random_image(1).save(allowed / "ok.png")
    random_image(2).save(tmp_path / "outside.png")
    with running_server(sharp_dir, "--max-model-len", "128", "--max-media-bytes", "20000",
                        "--allowed-local-media-path", str(allowed)) as srv:
        def post(body, raw: bytes | None = None) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                              content=raw if raw is not None else json.dumps(body).encode())

        ok = {"model": srv.name, "messages": user_message("hello"), "max_tokens": 8}

        def expect(resp: httpx.Response, status: int, *words: str, param: str | None = None) -> None:
            assert resp.status_code == status, resp.text
            err = resp.json()["error"]
            for w in words:
                assert w in err["message"], (w, err)
            if param is not None:
                assert err["param"] == param

        expect(post(None, b"{not json"), 400, "not valid JSON")
        expect(post({**ok, "model": "other"}), 404, "'other' is not served", param="model")
        expect(post({**ok, "messages": user_message("word " * 200)}), 400, "--max-model-len", "128",
               param="messages")
        expect(post({**ok, "max_tokens": 120}), 400, "max_tokens 120 does not fit", "--max-model-len",
               param="max_tokens")
        expect(post({**ok, "max_tokens": 0}), 400, "max_tokens must be >= 1", param="max_tokens")
        expect(post({**ok, "confidence_threshold": 1.5}), 400, "confidence_threshold must be in [0, 1]",
               param="confidence_threshold")
        expect(post(None, json.dumps(ok).replace('"max_tokens": 8', '"temperature": NaN').encode()), 400,
               "temperature must be a finite number", param="temperature")
        expect(post({**ok, "top_p": 2}), 400, "top_p must be in (0, 1]", param="top_p")
        expect(post({**ok, "messages": [{"role": "robot", "content": "x"}]}), 400, param="messages[0].role")
        garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
        bad_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": garbage}}]}]
        expect(post({**ok, "messages": bad_image}), 400, "not a readable image",
               param="messages[0].content[0].image_url")
        big = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + "A" * 40000}}]}]
        expect(post({**ok, "messages": big}), 413, "--max-media-bytes")
        wide = png_data_url(random_image(3, 2, 600))
        expect(post({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": wide}}]}]}), 400, "aspect ratio")
        local = lambda p: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(p)}}]}]  # noqa: E731
        expect(post({**ok, "messages": local(tmp_path / "outside.png")}), 403, "outside the allowed directory")
        expect(post({**ok, "messages": local("http://example.com/x.png")}), 400, "remote URLs are not fetched")
        video = [{"role": "user", "content": [{"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()}}, {"type": "text",
                                                                                         "text": "what?"}]}]
        expect(post({**ok, "messages": video}), 400, param="messages")
        assert post({**ok, "messages": local(allowed / "ok.png")}).status_code == 200  # allow-listed file
        good = post(ok)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'nemo_bard_requests_total{status="400"}' in metrics and "nemo_bard_forwards_total" in metrics


def test_full_queue_answers_429_with_retry_after(sharp_dir):
    with running_server(sharp_dir, "--max-batch", "1", "--max-queue", "1", "--ignore-eos") as srv:
        body = json.dumps({"model": srv.name, "messages": user_message("hello"), "max_tokens": 200,
                           "confidence_threshold": 1.0}).encode()

        def post(_):
            return httpx.post(f"{srv.url}/v1/chat/completions", content=body, timeout=60)

        with futures.ThreadPoolExecutor(5) as pool:
            statuses = list(pool.map(post, range(5)))
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) >= 2 and 429 in codes, codes  # one running, one queued, the rest refused
    refused = next(r for r in statuses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1" and "--max-queue 1" in refused.json()["error"]["message"]


def _output_tokens(url: str) -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith("nemo_bard_output_tokens_total"))
    return float(line.split()[-1])


def test_a_client_that_goes_away_or_times_out_frees_its_row(sharp_dir):
    with running_server(sharp_dir, "--ignore-eos") as srv:  # no stop token: the request runs its 1,000 tokens
        sched = srv.scheduler
        long = {"model": srv.name, "messages": user_message("hello"), "max_tokens": 1000, "stream": True,
                "confidence_threshold": 1.0, "return_token_ids": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=long, timeout=30) as resp:
            # the role chunk is sent before admission; the first tokens' chunk means the request runs
            next(line for line in resp.iter_lines() if '"token_ids"' in line)
        deadline = time.monotonic() + 20  # the client is gone: its row is freed before the next forward
        while sched.session.running and time.monotonic() < deadline:
            time.sleep(0.02)
        # answered 499 (client gone), not 200: the disconnect ended it, after fewer than its 1,000 tokens
        assert sched.session.running == 0 and 'status="499"' in httpx.get(f"{srv.url}/metrics").text
        assert 'status="200"' not in httpx.get(f"{srv.url}/metrics").text and _output_tokens(srv.url) < 1000

        srv.app.state.config.request_timeout = 0.2
        slow = httpx.post(f"{srv.url}/v1/chat/completions", json={**long, "stream": False}, timeout=30)
        assert slow.status_code == 504 and "timed out after 0.2 s" in slow.json()["error"]["message"]
        assert sched.session.running == 0


def test_a_failing_request_or_forward_leaves_the_others_alone(sharp_dir, sharp):
    model, processor = sharp
    with running_server(sharp_dir, "--max-batch", "4") as srv:
        sched = srv.scheduler
        engine = sched.session.engine
        marker = processor.tokenizer.encode("zebra")[0]
        real_prefill = engine.prefill

        def prefill(pool, rows, ids, *args):  # one request's prefill raises
            if (ids == marker).any():
                raise RuntimeError("injected prefill failure")
            return real_prefill(pool, rows, ids, *args)

        engine.prefill = prefill
        try:
            def ask(text):
                return srv.client.chat.completions.with_raw_response.create(
                    model=srv.name, messages=user_message(text), max_tokens=12, extra_body={"return_token_ids": True})

            with futures.ThreadPoolExecutor(2) as pool:
                bad, good = pool.map(lambda t: _status(ask, t), ["zebra", "hello"])
        finally:
            engine.prefill = real_prefill
        assert bad[0] == 500 and "injected prefill failure" in bad[1]
        assert good[0] == 200

        real_step = engine.run_step
        calls = {"n": 0}

        def failing_step(*args):  # one batched forward raises: that batch fails, the server recovers
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected step failure")
            return real_step(*args)

        engine.run_step = failing_step
        try:
            status, text = _status(ask, "hello")
        finally:
            engine.run_step = real_step
        assert status == 500 and "injected step failure" in text
        after = srv.client.chat.completions.create(model=srv.name, messages=user_message("hello"), max_tokens=12,
                                                   extra_body={"return_token_ids": True})
        assert after.choices[0].model_extra["token_ids"] == solo(model, processor, "hello", None, 12, {})


def _status(ask, text) -> tuple[int, str]:
    try:
        raw = ask(text)
        return raw.status_code, raw.text
    except openai.APIStatusError as exc:
        return exc.status_code, exc.message


def test_ar_decoder_serves_an_ar_directory_through_the_same_api(tiny_ar_dir, tiny_processor):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_ar_dir, dtype=torch.float32).eval()
    enc = build_inputs(tiny_processor, [user_conversation("Read the digits.", [random_image(1)])])
    want = ar_generate(model, **enc, max_new_tokens=10, eos_token_id=stop_ids(model, tiny_processor.tokenizer))
    with running_server(tiny_ar_dir, "--decoder", "ar") as srv:
        r = srv.client.chat.completions.create(model=srv.name, messages=user_message("Read the digits.",
                                                                                     random_image(1)),
                                               max_tokens=10, extra_body={"return_token_ids": True})
        models = srv.client.models.list().data
    assert r.choices[0].model_extra["token_ids"] == want.sequences[0, : want.lengths[0]].tolist()
    assert r.usage.model_extra["forwards"] == r.usage.completion_tokens  # one token per forward
    assert models[0].id == srv.name and models[0].model_extra["decoder"] == "ar"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_sigterm_drains_running_requests_and_exits_0(tiny_bard_dir, tmp_path):
    """``python -m nemo_bard.serve``: SIGTERM during a streamed answer lets it finish, refuses new work, exit 0."""
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "nemo_bard.serve", "--model", str(tiny_bard_dir), "--port",
                             str(port), "--device", "cpu", "--shutdown-grace", "20", "--ignore-eos"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": Path(tiny_bard_dir).name, "messages": user_message("hello"), "max_tokens": 300,
                "stream": True, "confidence_threshold": 1.0, "return_token_ids": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.HTTPError):  # no new work: the listener is closed (or 503)
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=5).raise_for_status()
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[6:]) for e in events[:-1]]
        tokens = sum((c["choices"][0]["delta"].get("token_ids", []) for c in finals if c.get("choices")), [])
        assert finals[-1]["choices"][0]["finish_reason"] in ("length", "stop") and len(tokens) > 4
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_bench_summary_is_hand_computable():
    from nemo_bard.bench.serve import summarize, table

    recs = [dict(start=0.0, first=0.1, end=0.5, tokens=8, first_tokens=4, text="12", forwards=4, error=None, prompt=0,
                 decode_s=0.3),
            dict(start=0.0, first=0.3, end=1.0, tokens=4, first_tokens=4, text="x", forwards=2, error=None, prompt=1,
                 decode_s=0.5),
            dict(start=0.2, first=None, end=0.3, tokens=0, first_tokens=0, text="", forwards=None, error="HTTP 429",
                 prompt=0)]
    s = summarize(recs, 2.0, [([], "12"), ([], "34")])
    assert (s["requests"], s["failed"], s["errors"]) == (3, 1, ["HTTP 429"])
    assert s["requests_per_s"] == 1.0 and s["output_tokens_per_s"] == 6.0  # 12 tokens of 2 good requests in 2 s
    assert s["after_first_tokens_per_s_per_request"] == pytest.approx(4 / 1.1)  # (8-4)+(4-4) tokens in 0.4+0.7 s
    assert s["decode_tokens_per_s_per_request"] == pytest.approx(12 / 0.8)  # 8+4 tokens in 0.3+0.5 s of decoding
    assert s["tokens_per_forward"] == 2.0 and s["exact_match"] == 0.5  # "12" right, "x" wrong
    assert s["ttft_p50_ms"] == pytest.approx(200.0) and s["latency_p50_ms"] == pytest.approx(750.0)
    row = {"server": "bard", "concurrency": 1, **s}
    assert "| bard | 1 | 1.00 | 6.0 | 15.0 | 200 / 298 | 750 / 995 | 2.00 | 50.0 % | 1 |" in table({"levels": [row]})


def test_closed_loop_load_generator_against_a_real_server(sharp_dir):
    import asyncio

    from nemo_bard.bench.serve import closed_loop

    prompts = [(user_message("hello"), None), (user_message("Read the digits.", random_image(1)), None)]
    with running_server(sharp_dir, "--max-batch", "4") as srv:
        records, wall = asyncio.run(closed_loop(srv.url, srv.name, prompts, 3, 7, None, 12, {}, 60))
    assert len(records) == 7 and all(r["error"] is None for r in records) and wall > 0
    assert all(r["start"] <= r["first"] <= r["end"] and 1 <= r["tokens"] <= 12 and r["forwards"] >= 1
               for r in records)
    answers: dict[int, set] = {}
    for r in records:
        answers.setdefault(r["prompt"], set()).add((r["text"], r["tokens"]))
    assert sorted(answers) == [0, 1] and all(len(v) == 1 for v in answers.values())  # greedy: the same answer


def test_serve_refuses_bad_options_in_one_line_before_loading(tiny_bard_dir, tiny_ar_dir, capsys):
    from nemo_bard.serve import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--model", str(tiny_bard_dir), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err
    assert main(["--model", str(tiny_ar_dir), "--decoder", "bard"]) == 2
    assert "is not bard_vl; convert it first" in capsys.readouterr().err
    assert main(["--model", "/nope"]) == 2 and "--model directory /nope not found" in capsys.readouterr().err
    assert main(["--model", str(tiny_bard_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
