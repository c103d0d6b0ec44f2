"""Replicas on Ray Serve (rawpaged/server/ray_serve.py): two CPU replicas of the demo model behind
one OpenAI endpoint, driven through the `openai` client.

- 100 requests all complete, and both replicas take some;
- prefix routing: 20 requests sharing a prefix all land on one replica, whose prefix-cache hits
  show it (the other replica's do not move);
- killing a replica mid-run: the requests it held end with a clear error, every other request
  completes, nothing hangs; Serve restarts the replica and the endpoint serves again.

Ray starts once for this module (a local instance, 2 CPUs: one per replica). Ray on a busy 2-core
machine is slow to start: the timeouts are generous and nothing is timed.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from rawpaged.engine import EngineConfig  # noqa: E402
from rawpaged.hub import DEMO_MODEL  # noqa: E402
from rawpaged.server.ray_serve import REPLICA_HEADER, OpenAIIngress, ReplicaOptions, build_app  # noqa: E402
from rawpaged.server.routing import PrefixTable, prefix_hashes, route_text  # noqa: E402

MODEL = "stories260K"
NAMES = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia", "Sam", "Zoe", "Tim", "Amy"]


@pytest.fixture(scope="module")
def url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = EngineConfig(model=str(DEMO_MODEL), device="cpu", kv_cache_memory=32 << 20, max_num_seqs=64)
    serve.run(build_app(config, ReplicaOptions(MODEL), num_replicas=2), name="rawpaged", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def replicas(url) -> dict:
    return {r["replica"]: r for r in httpx.get(url + "/v1/replicas", timeout=60).json()["data"]}


def complete(client, prompt: str, max_tokens: int = 8):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0)
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_100_requests_all_complete(client, url):
    prompts = [f"{NAMES[i % 10]} went to the park on day {i}" for i in range(100)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: complete(client, p, 12), prompts))
    assert len(results) == 100
    for _, out in results:
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens > 0
    served = {rid for rid, _ in results}
    assert len(served) == 2, served                             # both replicas took requests
    stats = replicas(url)
    assert set(stats) == served and sum(r["stats"]["num_finished"] for r in stats.values()) >= 100


def test_prefix_routing_sends_a_shared_prefix_to_one_replica(client, url):
    prefix = ("Once upon a time, in a small town by the sea, there lived a kind old fisherman who had a "
              "little boat, a big net and a cat named Whiskers. Every morning he went out to fish and every "
              "evening he told the children of the town a story about the sea. ")
    before = replicas(url)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: complete(client, prefix + f"One day {n} asked him", 8), NAMES * 2))
    owners = {rid for rid, _ in results}
    assert len(owners) == 1, owners                             # all 20 on one replica
    (owner,) = owners
    complete(client, prefix + "At last")                        # its answer carries the final stats
    after = replicas(url)
    hits = {rid: after[rid]["stats"]["prefix_cache_hits"] - before.get(rid, {"stats": {"prefix_cache_hits": 0}})[
        "stats"]["prefix_cache_hits"] for rid in after}
    assert hits[owner] >= 20, hits                              # every request after the first reused the prefix
    assert all(h == 0 for rid, h in hits.items() if rid != owner), hits


def test_killing_a_replica_mid_run_leaves_no_request_hanging(client, url):
    first_chunk, outcomes = threading.Event(), []
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def stream(i: int):
        try:
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=f"{NAMES[i % 10]} and the dragon, part {i}", max_tokens=400, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            rid = raw.headers[REPLICA_HEADER]
            with lock:
                seen[rid] = seen.get(rid, 0) + 1
            text, finish = "", None
            for chunk in raw.parse():
                first_chunk.set()
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            outcomes.append(("ok", rid, finish))
        except openai.APIError as e:                            # the error event of a broken stream, or a 503
            outcomes.append(("error", None, str(e)))

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    assert first_chunk.wait(300)
    with lock:
        victim = max(seen, key=seen.get)                        # a replica with streams in flight
    os.kill(replicas(url)[victim]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica died"
    assert len(outcomes) == 12
    errors = [o for o in outcomes if o[0] == "error"]
    assert errors and all("replica" in e[2] for e in errors), outcomes
    assert any(o[0] == "ok" and o[1] != victim and o[2] == "length" for o in outcomes), outcomes
    # Serve restarts it; the endpoint serves again on two replicas
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = serve.status().applications["rawpaged"].deployments["EngineReplica"]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the replica was not restarted: {status}")
    _, out = complete(client, "Once upon a time")
    assert out.choices[0].text


# -- the routing policy and the replica table without Ray ------------------------------------------
def test_prefix_table_matches_the_longest_prefix_of_a_live_replica():
    table = PrefixTable(capacity=1000, chunk=4)
    table.record("abcdefghijkl", "A")                         # chunks abcd, efgh, ijkl
    table.record("abcdefgh", "B")                             # B served abcd, efgh last
    assert table.match("abcdefghijklmnop", ["A", "B"]) == ("A", 3)
    assert table.match("abcdefghXXXX", ["A", "B"]) == ("B", 2)
    assert table.match("abcdefghijkl", ["A"]) == ("A", 3)
    assert table.match("abcdefgh", ["A"]) == (None, 0)        # its owner B is gone
    assert table.match("zzzz", ["A", "B"]) == (None, 0)
    table.forget("A")
    assert table.match("abcdefghijkl", ["A", "B"]) == ("B", 2)
    assert prefix_hashes("abc", 4) == [] and len(prefix_hashes("abcdefgh", 4)) == 2
    small = PrefixTable(capacity=2, chunk=4)
    small.record("abcdefghijkl", "A")
    assert len(small.owner) == 2                              # the least recent hash was forgotten


def test_route_text_of_completions_and_chats():
    assert route_text({"prompt": "hello"}) == "hello"
    assert route_text({"prompt": ["first", "second"]}) == "first"
    assert route_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert route_text({"messages": [{"role": "system", "content": "be kind"},
                                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == \
        "system:be kind\nuser:hi\n"
    assert route_text({"model": "x"}) is None and route_text([1]) is None


def test_the_replica_table_keeps_each_replicas_newest_snapshot():
    """Answers reach the ingress in any order: an older snapshot never replaces a newer one."""
    ingress = OpenAIIngress(engine_handle=None)

    def about(rid, pid, n, finished):
        return {"replica": rid, "pid": pid, "snapshot": n, "stats": {"num_finished": finished}}

    ingress._seen(about("A", 10, 2, 50))
    ingress._seen(about("A", 10, 1, 49))                      # a slower answer, taken before
    ingress._seen(about("B", 11, 1, 7))
    assert ingress.replicas["A"]["stats"]["num_finished"] == 50
    assert ingress.replicas["B"]["stats"]["num_finished"] == 7
    ingress._seen(about("A", 12, 1, 0))                       # restarted: a new process counts anew
    assert ingress.replicas["A"]["pid"] == 12 and ingress.replicas["A"]["stats"]["num_finished"] == 0
