"""``mmgen serve --ray``: two Ray Serve replicas of the demo captioner on a local Ray instance (CPU,
127.0.0.1 only), answering as the pipeline does, streaming through Ray's proxy, and leaving no Ray
process behind after SIGTERM. About 30 s on two idle cores."""
import base64
import concurrent.futures
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'mmgen_engine[ray]'")
pytest.importorskip("fastapi", reason="needs the server's dependencies: pip install 'mmgen_engine[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx")

from servers import Server, demo_models, wait_until  # noqa: E402

import mmgen_engine as mm  # noqa: E402
from mmgen_engine.demo.world import sample  # noqa: E402
from mmgen_engine.serving.http import ServerConfig  # noqa: E402
from mmgen_engine.serving.ray import deployment  # noqa: E402

READY_TIMEOUT = 180  # a local Ray instance and two replicas loading the model: ~15 s on an idle 2-core box
EXIT_TIMEOUT = 60


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (Ray's GCS, raylet, proxy, controller, replicas, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _png_b64(image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def server():
    """``mmgen serve --ray --replicas 2`` of the demo captioner, with a Ray instance of its own (its own
    temporary directory, so it neither joins nor disturbs another Ray on this machine)."""
    tmp = tempfile.mkdtemp(prefix="mmgen-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    srv = Server([*demo_models("captioning"), "--ray", "--replicas", "2"], READY_TIMEOUT, env)
    srv.env = {**os.environ, **env}
    srv.pids = _descendants(srv.proc.pid)
    try:
        yield srv
    finally:
        srv.pids |= _descendants(srv.proc.pid)
        srv.stop()
        for pid in _alive(srv.pids - {os.getpid()}):  # a safety net, by id: this test's Ray processes only
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_deployment_follows_the_config():
    config = ServerConfig({"a": "/ckpt"}, device="cuda:0", slots=4, max_queued=16, grace_s=5)
    d = deployment(config, replicas=3)._bound_deployment  # Ray keeps the Deployment of a bound app there
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 1
    assert d.max_ongoing_requests == 4 + 16
    assert deployment(ServerConfig({"a": "/ckpt"}))._bound_deployment.ray_actor_options["num_gpus"] == 0
    scaled = deployment(config, autoscaling={"min_replicas": 1, "max_replicas": 4}, num_gpus=0.5,
                        num_cpus=2)._bound_deployment
    auto = scaled._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 4)
    assert (scaled.ray_actor_options["num_gpus"], scaled.ray_actor_options["num_cpus"]) == (0.5, 2)
    with pytest.raises(mm.InputError, match="replicas"):
        deployment(config, replicas=0)


def test_two_replicas_caption_as_the_pipeline(server):
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["models"] == {"captioning": "captioning"}
    status = subprocess.run(
        [sys.executable, "-c", "import json, ray; from ray import serve; ray.init(address='auto', log_to_driver=False);"
         "print(json.dumps({str(k): v for k, v in serve.status().applications['mmgen'].deployments['MMGenServer']"
         ".replica_states.items()}))"], env=server.env, capture_output=True, text=True, timeout=90)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout.strip().splitlines()[-1]) == {"RUNNING": 2}, server.log()[-3000:]

    pipe = mm.load(mm.demo_model("captioning"))
    images = [image for image, _ in sample(6, seed=11)]
    expected = [pipe.caption([image])[0] for image in images]
    one = httpx.post(f"{server.url}/v1/captions", json={"images": [_png_b64(images[0])]}, timeout=60)
    assert one.status_code == 200, one.text
    assert one.json() == {"model": "captioning", "captions": expected[:1]}

    def caption(image):
        return httpx.post(f"{server.url}/v1/captions", json={"images": [_png_b64(image)]}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(caption, images))
    assert [a.status_code for a in answers] == [200] * len(images), [a.text for a in answers]
    assert [a.json()["captions"][0] for a in answers] == expected


def test_streaming_passes_through_the_proxy(server):
    image, _ = sample(1, seed=5)[0]
    expected = mm.load(mm.demo_model("captioning")).caption([image])[0]
    events = []
    with httpx.stream("POST", f"{server.url}/v1/captions", json={"images": [_png_b64(image)], "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for block in "".join(response.iter_text()).split("\n\n"):
            if block.strip():
                kind, data = block.split("\n")
                assert kind.startswith("event: ") and data.startswith("data: ")
                events.append(json.loads(data[len("data: "):]))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and "caption.delta" in kinds, kinds
    assert "".join(e["text"] for e in events if e["type"] == "caption.delta") == expected
    assert events[-1]["captions"] == [expected]


def test_sigterm_stops_serve_and_ray(server):
    server.pids |= _descendants(server.proc.pid)
    assert len(server.pids) > 3  # the CLI, Ray's GCS and raylet, Serve's actors
    start = time.monotonic()
    assert server.terminate(EXIT_TIMEOUT) == 0, server.log()[-3000:]
    took = time.monotonic() - start
    assert took < EXIT_TIMEOUT
    wait_until(lambda: not _alive(server.pids), 30, 0.2, "every process of the server and its Ray instance exiting")
