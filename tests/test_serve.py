"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 and the official `openai` client.
Greedy answers of concurrent requests equal the same requests run alone through Pipeline; bad requests get
their status while good ones running next to them succeed."""

import base64
import io
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import PROMPTS, images
from leanvlm import Pipeline
from leanvlm.serve import ServeOptions, create_app

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """A real uvicorn server on a free local port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline.load(engines(0.33).out)


@pytest.fixture(scope="module")
def server(pipe):
    srv = UvicornThread(create_app(pipe, ServeOptions(max_batch=4, max_queue=16, api_key=KEY, model_name="m")))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=120, max_retries=0)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *[{"type": "image_url", "image_url": {"url": u}} for u in urls]]}]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims 900 megapixels in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_chat_completion_with_image(client, pipe):
    img = images(1)[0]
    res = client.chat.completions.create(model="m", messages=user(PROMPTS[0], data_url(png(img))), max_tokens=12,
                                         temperature=0)
    solo = pipe.generate(image=img, prompt=PROMPTS[0], max_new_tokens=12)
    assert res.choices[0].message.content == solo.text and res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason == {"eos": "stop", "length": "length"}[solo.finish_reason]
    u = res.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(solo.prompt_token_ids), len(solo.token_ids))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    d = u.prompt_tokens_details
    assert (d.image_tokens, d.model_extra["image_tokens_kept"]) == (64, 21)


def test_streaming_chunks_join_to_the_answer(client, pipe):
    img = images(2)[1]
    stream = client.chat.completions.create(model="m", messages=user(PROMPTS[1], data_url(png(img))), max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    solo = pipe.generate(image=img, prompt=PROMPTS[1], max_new_tokens=20)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == solo.text and len([p for p in pieces if p]) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [{"eos": "stop", "length": "length"}[solo.finish_reason]]
    assert chunks[-1].usage.completion_tokens == len(solo.token_ids) and not chunks[-1].choices


def test_concurrent_good_and_bad_requests(server, client, pipe, engines):
    imgs = images(3)
    good = [(imgs[i % 3], PROMPTS[i % 3], 8 + 4 * i) for i in range(6)]
    expected = [pipe.generate(image=im, prompt=p, max_new_tokens=n).text for im, p, n in good]
    ok_url = data_url(png(imgs[0]))
    bad = {
        "no image": (400, dict(messages=[{"role": "user", "content": "Hi"}])),
        "two images": (400, dict(messages=user("Hi", ok_url, ok_url))),
        "broken base64": (400, dict(messages=user("Hi", "data:image/png;base64,iVBOR%%%w0KGgo"))),
        "not an image": (400, dict(messages=user("Hi", data_url(b"GIF89a-not-really")))),
        "decompression bomb": (413, dict(messages=user("Hi", data_url(bomb_png())))),
        "prompt past the limit": (400, dict(messages=user("shape " * 700, ok_url))),
        "max_tokens past the limit": (400, dict(messages=user("Hi", ok_url), max_tokens=100000)),
        "http url not allowed": (400, dict(messages=user("Hi", "http://127.0.0.1:9/x.png"))),
        "unknown model": (404, dict(messages=user("Hi", ok_url), model="other")),
        "wrong key": (401, dict(messages=user("Hi", ok_url))),
    }

    def run_good(job):
        im, p, n = job
        r = client.chat.completions.create(model="m", messages=user(p, data_url(png(im))), max_tokens=n, temperature=0)
        return r.choices[0].message.content

    def run_bad(name):
        status, kw = bad[name]
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="nope" if name == "wrong key" else KEY, timeout=60,
                          max_retries=0)
        try:
            c.chat.completions.create(**{"model": "m", "temperature": 0, "max_tokens": 4, **kw})
        except openai.APIStatusError as e:
            return e.status_code, e.body
        return 200, None

    with ThreadPoolExecutor(16) as pool:
        good_f = [pool.submit(run_good, j) for j in good]
        bad_f = {name: pool.submit(run_bad, name) for name in bad}
        answers = [f.result(timeout=300) for f in good_f]
        statuses = {name: f.result(timeout=300) for name, f in bad_f.items()}
    assert answers == expected
    for name, (status, body) in statuses.items():
        assert status == bad[name][0], (name, status, body)
        assert body["message"] and body["type"], (name, body)  # an OpenAI error object
    assert statuses["prompt past the limit"][1]["code"] == "context_length_exceeded"
    assert "exactly one image" in statuses["two images"][1]["message"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'leanvlm_requests_total{status="400"}' in metrics and "leanvlm_time_to_first_token_seconds_bucket" in metrics
    assert "leanvlm_batch_occupancy" in metrics and "leanvlm_queue_depth" in metrics
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line[:1] != "#"}
    steps = values["leanvlm_decode_step_requests_count"]
    assert steps > values['leanvlm_decode_step_requests_bucket{le="1.0"}']  # some steps decoded several requests
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["max_batch"] == 4


def test_models_and_key_check(server, client):
    assert [m.id for m in client.models.list().data] == ["m"]
    r = httpx.get(server.url + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    big = b"x" * (33 << 20)
    r = httpx.post(server.url + "/v1/chat/completions", content=big, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413


def test_full_queue_answers_429(pipe):
    srv = UvicornThread(create_app(pipe, ServeOptions(max_batch=1, max_queue=0)))
    try:
        sched = srv.server.config.app.state.scheduler
        hold = sched.submit(pipe.preprocess.prepare(images(1)[0], "Hi"),
                            pipe.params(max_new_tokens=250, ignore_eos=True))  # occupies the only slot
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=60, max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=srv.server.config.app.state.pipeline.spec.directory.name,
                                      messages=user("Hi", data_url(png(images(1)[0]))), max_tokens=2)
        assert e.value.body["code"] == "queue_full"
        hold.cancel()
        assert [ev for ev in hold.events(timeout=30)][-1].finish_reason == "cancelled"
    finally:
        srv.close()


def test_cli_serve_process(engines, tmp_path):
    """`leanvlm serve` as a user starts it: its own process, a key, then a clean stop on SIGTERM."""
    import os
    import subprocess
    import sys

    from leanvlm.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2  # not an engine directory: one line, exit 2
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "leanvlm.cli", "serve", str(engines(0.33).out), "--port", str(port),
                             "--api-key", "k", "--max-batch", "2", "--log-level", "warning"],
                            env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}, timeout=10)
        assert models.json()["data"][0]["id"] == engines(0.33).out.name
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
    finally:
        proc.terminate()
        rc = proc.wait(30)
    err = proc.stderr.read()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15)
    assert rc in (0, -15) and "Traceback" not in err, (rc, err[-2000:])


def test_http_image_urls_when_allowed(pipe):
    """--allow-image-urls: an http URL is fetched; too big -> 413, too slow or missing -> 400, within limits."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from leanvlm.serve import Limits

    img = images(1)[0]
    files = {"/ok.png": png(img), "/big.png": b"\0" * 200_000}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(3)
            body = files.get(self.path)
            try:
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")
            except OSError:  # the server under test gave up on the slow one
                pass

        def log_message(self, *args):
            pass

    files_srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files_srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files_srv.server_address[1]}"
    srv = UvicornThread(create_app(pipe, ServeOptions(max_batch=2, model_name="m", limits=Limits(
        allow_image_urls=True, max_image_bytes=100_000, url_timeout_s=1.0))))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=60, max_retries=0)
        res = c.chat.completions.create(model="m", messages=user(PROMPTS[0], base + "/ok.png"), max_tokens=6,
                                        temperature=0)
        assert res.choices[0].message.content == pipe.generate(image=img, prompt=PROMPTS[0], max_new_tokens=6).text
        for path, status in (("/big.png", 413), ("/missing.png", 400), ("/slow.png", 400)):
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model="m", messages=user("Hi", base + path), max_tokens=2)
            assert e.value.status_code == status and time.monotonic() - t0 < 2.5, (path, e.value)
        with pytest.raises(openai.BadRequestError):  # only http(s) and data: URLs
            c.chat.completions.create(model="m", messages=user("Hi", "file:///etc/passwd"), max_tokens=2)
    finally:
        srv.close()
        files_srv.shutdown()


def test_client_gone_frees_its_slot(server, pipe):
    """A streaming client that disconnects mid-answer: its request leaves the batch at the next step."""
    img = images(1)[0]
    solo = pipe.generate(image=img, prompt=PROMPTS[1], max_new_tokens=200)
    assert solo.finish_reason == "length"  # alone it would decode all 200 tokens
    sched = server.server.config.app.state.scheduler
    steps0 = sched.steps
    body = {"model": "m", "messages": user(PROMPTS[1], data_url(png(img))), "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            contents = 0
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    contents += 1
                if contents >= 2:
                    break
            assert sched.running == 1
    deadline = time.monotonic() + 20
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.running == 0 and sched.runner.free == sched.max_batch
    assert sched.steps - steps0 < 150  # it stopped well before its 200 tokens
