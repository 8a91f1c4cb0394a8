"""Ray Serve scale-out: two replicas behind Ray Serve's HTTP proxy on a local Ray instance, the official
openai client, and one replica killed during a bounded load: every request succeeds or gets a clean HTTP
error (both counted), nothing hangs. Heavy on a 2-core machine: one module, deselect with -m 'not ray'."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import images
from test_serve import data_url, free_port, png, user

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def ray_server(engines):
    ray = pytest.importorskip("ray")
    from ray import serve

    from leanvlm.serve import ServeOptions
    from leanvlm.serve.ray_app import deploy

    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                       "HF_HUB_OFFLINE": "1"}})
    port = free_port()
    try:
        deploy(engines(0.33).out, "127.0.0.1", port, replicas=2, options=ServeOptions(max_batch=4, model_name="m"),
               threads=1, num_cpus=0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_pids(url: str, want: int = 2, tries: int = 60) -> set[int]:
    pids = set()
    for _ in range(tries):
        r = httpx.get(url + "/health", timeout=10)
        if r.status_code == 200:
            pids.add(r.json()["pid"])
        if len(pids) >= want:
            break
    return pids


def test_two_replicas_survive_a_killed_replica(ray_server):
    pids = _replica_pids(ray_server)
    assert len(pids) == 2, pids  # the proxy spreads requests over both replicas
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="x", timeout=60, max_retries=0)
    url = data_url(png(images(1)[0]))
    first = client.chat.completions.create(model="m", messages=user("Hi", url), max_tokens=6, temperature=0)
    assert first.choices[0].message.content is not None and first.usage.completion_tokens >= 1

    def one(i: int):
        t0 = time.monotonic()
        try:
            r = client.chat.completions.create(model="m", messages=user(f"Request {i}: what is shown?", url),
                                               max_tokens=24, temperature=0)
            return "ok", r.choices[0].message.content, time.monotonic() - t0
        except openai.APIStatusError as e:  # a clean HTTP error from the proxy or a replica
            return "error", e.status_code, time.monotonic() - t0
        except openai.APIConnectionError as e:
            return "connection", repr(e), time.monotonic() - t0

    victim = sorted(pids)[0]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)  # one replica dies with requests in flight
        outcomes = [f.result(timeout=180) for f in futures]  # nothing hangs
    ok = [o for o in outcomes if o[0] == "ok"]
    failed = [o for o in outcomes if o[0] != "ok"]
    print(f"\nreplica killed: {len(ok)} succeeded, {len(failed)} failed cleanly: {[o[:2] for o in failed]}")
    assert len(ok) + len(failed) == 24 and len(ok) >= 12
    assert all(o[0] == "error" and o[1] >= 500 for o in failed), failed  # HTTP errors, not dropped connections
    # the surviving replica (and Serve's replacement) keep serving
    after = client.chat.completions.create(model="m", messages=user("Hi", url), max_tokens=6, temperature=0)
    assert after.choices[0].message.content == first.choices[0].message.content
