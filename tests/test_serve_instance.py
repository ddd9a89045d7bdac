"""One instance in-process (FastAPI's TestClient, the tiny model): a served image equals the run's
with the same seed; per-step progress as server-sent events; a client that goes away stops its
job within a step; bad requests get a 4xx naming the field and never reach the engine; the prompt
embedding cache spares the text encoder, in the instance and through a real Redis shared by two
instances, and the service works on when Redis is down. Edits: a bad upload is refused naming
the field, an edit's files are removed however its job ends, and edits never batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from paraflow.api import compose, generate
from paraflow.serve.instance import build
from paraflow.serve.local import free_ports
from tests.conftest import read_images
from tests.serve_helpers import (
    COMPUTE,
    INSTANCE,
    counter,
    decoded,
    images_of,
    picture,
    square_mask,
)

URL = "/v1/images/generations"
EDITS = "/v1/images/edits"


@pytest.fixture(scope="module")
def app() -> Any:
    return build([*INSTANCE, "serve.limits.max_steps=400"])[1]


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def encoder_calls(app: Any) -> list[int]:
    calls = [0]
    app.state.engine.pipe.text_encoder.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_served_image_equals_the_run_with_the_same_seed(client: TestClient,
                                                          tmp_path: Path) -> None:
    body = {"prompt": "a red circle on the left", "n": 2, "size": "64x48", "steps": 4,
            "seed": 7, "guidance_scale": 4.0}
    answer = client.post(URL, json=body)
    assert answer.status_code == 200, answer.text
    assert [d["seed"] for d in answer.json()["data"]] == [7, 8]
    # The instance's model and thread count (COMPUTE): the same stage graph, batch and kernels.
    run = generate(compose([*COMPUTE, "prompt=a red circle on the left", "images_per_prompt=2",
                            "width=64", "height=48", "steps=4", "seed=7", "guidance_scale=4.0",
                            "pipeline.progress=false"]), tmp_path / "run")
    assert run["n_images"] == 2
    for served, made in zip(images_of(answer.json()), read_images(tmp_path / "run")):
        assert served.shape == (48, 64, 3)
        assert np.array_equal(served, made)  # the same code path and threads: bit-identical


def test_progress_events_then_the_image(client: TestClient) -> None:
    body = {"prompt": "a blue square", "steps": 5, "seed": 3}
    events = []
    with client.stream("POST", URL, json={**body, "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    assert [e["step"] for k, e in events if k == "progress"] == [1, 2, 3, 4, 5]
    kind, result = events[-1]
    assert kind == "result"
    plain = client.post(URL, json=body).json()
    assert np.array_equal(images_of(result)[0], images_of(plain)[0])


def test_a_client_that_goes_away_stops_its_job_within_a_step(app: Any,
                                                             client: TestClient) -> None:
    engine = app.state.engine
    body = {"prompt": "a green triangle", "size": "256x256", "steps": 400, "stream": True}
    with client.stream("POST", URL, json=body) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["step"] >= 2:
                break
        at_close = counter(app, "paraflow_denoise_steps_total")
    deadline = time.monotonic() + 60
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    ran_after = counter(app, "paraflow_denoise_steps_total") - at_close
    print(f"steps run after the client closed its stream: {ran_after:.0f} (of 400)")
    assert not engine.running and ran_after <= 2  # the step in flight, then the check
    assert counter(app, "paraflow_errors_total") >= 1  # counted as cancelled
    assert client.post(URL, json={"prompt": "a red circle", "steps": 2}).status_code == 200


BAD = [  # (body or raw, headers, status, field named in the answer)
    ({"prompt": "x", "colour": "red"}, {}, 400, "colour"),
    ({"prompt": ""}, {}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, {}, 400, "prompt"),
    ({"size": "64x64"}, {}, 400, "prompt"),
    ({"prompt": "x", "n": "2"}, {}, 400, "n"),
    ({"prompt": "x", "n": 0}, {}, 400, "n"),
    ({"prompt": "x", "n": 5}, {}, 400, "n"),
    ({"prompt": "x", "steps": 3.5}, {}, 400, "steps"),
    ({"prompt": "x", "steps": 401}, {}, 400, "steps"),
    ({"prompt": "x", "size": "64"}, {}, 400, "size"),
    ({"prompt": "x", "size": "65x64"}, {}, 400, "size"),
    ({"prompt": "x", "size": "2048x2048"}, {}, 400, "size"),
    ({"prompt": "x", "response_format": "url"}, {}, 400, "response_format"),
    ({"prompt": "x", "seed": -1}, {}, 400, "seed"),
    ({"prompt": "x", "guidance_scale": 99}, {}, 400, "guidance_scale"),
    ({"prompt": "x", "scheduler": "lms"}, {}, 400, "scheduler"),
    ({"prompt": "x", "model": "sdxl"}, {}, 400, "model"),
    ([1, 2], {}, 400, "body"),
    (b"{not json", {"content-type": "application/json"}, 400, "body"),
    (b'{"prompt": "x"}', {"content-type": "text/plain"}, 415, "content-type"),
    (b'{"prompt": "' + b"x" * 70000 + b'"}', {"content-type": "application/json"}, 413, "body"),
]


@pytest.mark.parametrize(("body", "headers", "status", "field"), BAD,
                         ids=[f"{s}-{f}-{i}" for i, (_, _, s, f) in enumerate(BAD)])
def test_a_bad_request_is_refused_before_the_engine(app: Any, client: TestClient, body: Any,
                                                    headers: dict[str, str], status: int,
                                                    field: str) -> None:
    steps = counter(app, "paraflow_denoise_steps_total")
    if isinstance(body, bytes):
        answer = client.post(URL, content=body, headers=headers)
    else:
        answer = client.post(URL, json=body, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["message"], error
    assert counter(app, "paraflow_denoise_steps_total") == steps  # never reached a device


def png_file(data: bytes) -> tuple[str, bytes, str]:
    return ("upload.png", data, "image/png")


IMAGE = {"image": png_file(picture())}
FORM = {"prompt": "a red circle", "steps": "2"}
BAD_EDITS = [  # (form fields, files, status, field named in the answer)
    (FORM, {"image": png_file(b"GIF89a, no more")}, 400, "image"),
    (FORM, {"image": png_file(picture()[:200])}, 400, "image"),  # truncated
    (FORM, {"mask": png_file(square_mask())}, 400, "image"),  # no image
    (FORM, [("image", png_file(picture())), ("image", png_file(picture()))], 400, "image"),
    ({**FORM, "image": "a path?"}, {"mask": png_file(square_mask())}, 400, "image"),
    (FORM, {"image": png_file(picture(1040, 8))}, 400, "image"),  # past max_side
    (FORM, {**IMAGE, "mask": png_file(b"not a mask")}, 400, "mask"),
    (FORM, {**IMAGE, "mask": png_file(square_mask(64, 48))}, 400, "mask"),
    (FORM, {"image": png_file(picture(60, 60))}, 400, "size"),  # auto: 60 is no multiple of 8
    ({**FORM, "size": "65x64"}, IMAGE, 400, "size"),
    ({**FORM, "colour": "red"}, IMAGE, 400, "colour"),
    (FORM, {**IMAGE, "extra": png_file(picture())}, 400, "extra"),
    ({**FORM, "strength": "0"}, IMAGE, 400, "strength"),
    ({**FORM, "strength": "1.5"}, IMAGE, 400, "strength"),
    ({**FORM, "strength": "0.2"}, IMAGE, 400, "strength"),  # 2 steps × 0.2: no step runs
    ({**FORM, "n": "two"}, IMAGE, 400, "n"),
    ({**FORM, "stream": "maybe"}, IMAGE, 400, "stream"),
    ({"steps": "2"}, IMAGE, 400, "prompt"),
    (FORM, {"image": png_file(picture(160, 160, noise=True))}, 413, "body"),  # > 64 KiB
]


@pytest.mark.parametrize(("form", "files", "status", "field"), BAD_EDITS,
                         ids=[f"{s}-{f}-{i}" for i, (_, _, s, f) in enumerate(BAD_EDITS)])
def test_a_bad_edit_is_refused_before_the_engine(app: Any, client: TestClient,
                                                 form: dict[str, str], files: Any,
                                                 status: int, field: str) -> None:
    steps = counter(app, "paraflow_denoise_steps_total")
    answer = client.post(EDITS, data=form, files=files)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["message"], error
    assert counter(app, "paraflow_denoise_steps_total") == steps  # never reached a device


@pytest.mark.parametrize(("body", "kind", "status", "field"), [
    (b'{"prompt": "x"}', "application/json", 415, "content-type"),
    (b"--x\r\nnot a form", "multipart/form-data; boundary=x", 400, "body"),
])
def test_an_edit_must_be_a_multipart_form(client: TestClient, body: bytes, kind: str,
                                          status: int, field: str) -> None:
    answer = client.post(EDITS, content=body, headers={"content-type": kind})
    assert answer.status_code == status and answer.json()["error"]["param"] == field


def test_an_edit_s_files_are_removed_however_its_job_ends(
        app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from paraflow.serve.jobs import Cancelled, Job, Uploads
    from paraflow.serve.requests import EditRequest
    from paraflow.session import FAULT_ENV

    engine = app.state.engine
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the job's folder goes
    seen: list[list[str]] = []

    def edit(on_progress: Any = None) -> Job:
        request = EditRequest(prompt="a red circle", steps=2, size="64x64")
        return Job(request, 64, 64, 0, on_progress=on_progress,
                   uploads=Uploads(picture(), square_mask()))

    def look(_: Any) -> None:
        seen.append(sorted(p.name for p in tmp_path.glob("paraflow-edit-*/*")))

    assert len(engine.submit(edit(look)).result(60)) == 1
    assert seen[0] == ["image", "mask"] and not any(tmp_path.iterdir())  # done
    cancelled = edit(lambda _: cancelled.cancelled.set())
    with pytest.raises(Cancelled):
        engine.submit(cancelled).result(60)
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv(FAULT_ENV, "0")  # rank 0 raises after the graph ran
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.submit(edit()).result(60)
    assert not any(tmp_path.iterdir())


def test_edits_run_alone(app: Any) -> None:
    from paraflow.serve.jobs import Job, Uploads
    from paraflow.serve.requests import EditRequest, ImagesRequest

    engine = app.state.engine
    blocker = threading.Event()
    first = Job(ImagesRequest(prompt="a", steps=2), 64, 64, 0,
                on_progress=lambda _: blocker.wait(30))
    alike = [Job(EditRequest(prompt="a", steps=2, size="64x64"), 64, 64, seed,
                 uploads=Uploads(picture())) for seed in (1, 2)]
    batches = counter(app, "paraflow_batches_total")
    futures = [engine.submit(j) for j in (first, *alike)]
    blocker.set()
    assert all(len(f.result(60)) == 1 for f in futures)
    assert counter(app, "paraflow_batches_total") - batches == 3


def test_the_api_key_is_required_when_set() -> None:
    app = build([*INSTANCE, "serve.api_key=s3cret"])[1]
    with TestClient(app) as client:
        body = {"prompt": "x", "steps": 1}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            answer = client.post(URL, json=body, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["param"] == "authorization"
        assert client.post(URL, json=body, headers={"authorization": "Bearer s3cret"}
                           ).status_code == 200
        for path in ("/v1/models", "/v1/models/tiny_random"):  # OpenAI's list needs it too
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"authorization": "Bearer s3cret"}
                              ).status_code == 200
        edit = client.post(EDITS, data={"prompt": "x", "steps": "1"}, files=IMAGE)
        assert edit.status_code == 401 and edit.json()["error"]["param"] == "authorization"


def test_health_readiness_metrics_and_instance(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"alive": True}
    assert client.get("/readyz").status_code == 200
    info = client.get("/v1/instance").json()
    assert info["model"] == "tiny_random" and info["limits"]["multiple"] == 8
    text = client.get("/metrics").text
    for name in ("paraflow_queue_depth", "paraflow_in_flight", "paraflow_request_seconds_bucket",
                 "paraflow_images_total", "paraflow_denoise_steps_total",
                 "paraflow_device_memory_bytes"):
        assert name in text, name
    assert "paraflow_redis_up" not in text  # no Redis configured: no gauge to alert on


def test_each_rank_s_device_and_an_out_of_memory_by_stage_are_exported(
        app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = app.state.engine

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.pipe.vae, "decode", out_of_memory)
    answer = client.post(URL, json={"prompt": "x", "steps": 1, "seed": 5})
    assert answer.status_code == 500 and "out of memory" in answer.json()["error"]["message"]
    monkeypatch.undo()
    assert client.post(URL, json={"prompt": "x", "steps": 1, "seed": 5}).status_code == 200
    scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples}
    assert scraped[("paraflow_oom_total", (("stage", "decode"),))] == 1
    cpu = (("device", "cpu"), ("rank", "0"))
    memory = scraped[("paraflow_device_memory_bytes", cpu)]
    assert 0 < memory < scraped[("paraflow_device_memory_limit_bytes", cpu)]
    # No NVML on a CPU: its readings are absent, not zero.
    assert not [key for key in scraped if key[0] in (
        "paraflow_device_temperature_celsius", "paraflow_device_power_watts",
        "paraflow_device_utilization_percent", "paraflow_device_throttled")]


def test_a_repeated_prompt_does_not_run_the_text_encoder(app: Any, client: TestClient) -> None:
    calls = encoder_calls(app)
    body = {"prompt": "a cyan ring in the center", "steps": 1}
    assert client.post(URL, json={**body, "seed": 1}).status_code == 200
    once = calls[0]  # diffusers' encode_prompt: the prompt, then the negative branch
    assert once == 2
    for seed in (2, 3):
        assert client.post(URL, json={**body, "seed": seed}).status_code == 200
    assert calls[0] == once  # from the cache
    assert client.post(URL, json={**body, "negative_prompt": "red"}).status_code == 200
    assert calls[0] == 2 * once  # another negative prompt is another embedding


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is needed (Debian: apt-get install redis-server)"
    port = free_ports(1)[0]
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.kill()
        server.wait()


def test_two_instances_share_embeddings_through_redis_and_survive_it_going(
        redis_url: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, server = redis_url
    first, second = (build([*INSTANCE, f"serve.cache.redis_url={url}"])[1] for _ in range(2))
    calls = [encoder_calls(first), encoder_calls(second)]
    body = {"prompt": "two purple stars at the top", "steps": 1}
    with TestClient(first) as a, TestClient(second) as b:
        assert a.post(URL, json=body).status_code == 200
        assert b.post(URL, json=body).status_code == 200
        assert calls[0][0] == 2 and calls[1][0] == 0  # the second read the first's from Redis
        assert counter(second, "paraflow_embedding_cache_total") >= 1
        server.kill()
        server.wait()
        fresh = {"prompt": "a brown diamond at the bottom", "steps": 1}
        assert b.post(URL, json=fresh).status_code == 200  # works on without the shared cache
        assert calls[1][0] == 2
        assert "paraflow_redis_up 0.0" in b.get("/metrics").text


def test_one_job_at_a_time_and_the_queue_bound(app: Any) -> None:
    """The worker runs jobs in order; a full queue answers Busy (429 at the HTTP layer)."""
    from paraflow.serve.jobs import Busy, Job
    from paraflow.serve.requests import ImagesRequest

    engine = app.state.engine
    blocker = threading.Event()
    slow = Job(ImagesRequest(prompt="a", steps=3), 64, 64, 0,
               on_progress=lambda _: blocker.wait(30))
    futures = [engine.submit(slow)]
    with pytest.raises(Busy):
        for seed in range(engine.jobs.maxsize + 1):
            futures.append(engine.submit(Job(ImagesRequest(prompt="a", steps=1), 64, 64, seed)))
    blocker.set()
    assert all(len(f.result(60)) == 1 for f in futures)


def test_requests_alike_waiting_together_run_as_one_batch(app: Any) -> None:
    from paraflow.serve.jobs import Job
    from paraflow.serve.requests import ImagesRequest

    engine = app.state.engine
    blocker = threading.Event()
    first = Job(ImagesRequest(prompt="a", steps=2), 64, 64, 0,
                on_progress=lambda _: blocker.wait(30))

    def job(prompt: str, n: int, seed: int, size: int = 64) -> Job:
        return Job(ImagesRequest(prompt=prompt, n=n, steps=3, size=f"{size}x{size}"),
                   size, size, seed)

    alike = [job("a red circle", 1, 11), job("a blue square", 2, 20), job("a white star", 1, 5)]
    other = job("a red circle", 1, 11, size=48)  # another shape: a batch of its own
    batches = counter(app, "paraflow_batches_total")
    futures = [engine.submit(j) for j in (first, *alike, other)]
    blocker.set()
    results = [f.result(60) for f in futures]
    assert counter(app, "paraflow_batches_total") - batches == 3  # first, the alike, the other
    assert [len(r) for r in results] == [1, 1, 2, 1, 1]
    for batched, made in zip(results[1:4], alike):  # each image as the job alone makes it
        alone = engine.submit(Job(made.request, 64, 64, made.seed)).result(60)
        for a, b in zip(batched, alone):  # a batch of 4 against 1 or 2: float rounding only
            assert np.abs(decoded(a).astype(int) - decoded(b).astype(int)).max() <= 1


@pytest.mark.parametrize("model", ["tiny_sd3_random", "tiny_flux_random"])
def test_a_diffusion_transformer_instance_serves_the_run_s_image(model: str,
                                                                 tmp_path: Path) -> None:
    """SD3 (joint attention, flow matching, classifier-free guidance) and Flux (packed tokens,
    embedded guidance) behind the same API: the served image equals the run's."""
    with TestClient(build([*INSTANCE, f"model={model}"])[1]) as dit:
        body = {"prompt": "a blue square", "size": "64x48", "steps": 3, "seed": 5,
                "guidance_scale": 3.5, "scheduler": "dpm"}  # a flow model keeps its own
        answer = dit.post(URL, json=body)
        inpaint = dit.post(EDITS, data={"prompt": "x", "steps": "2"},
                           files={**IMAGE, "mask": png_file(square_mask())})
    assert inpaint.status_code == 400 and inpaint.json()["error"]["param"] == "mask"
    assert model in inpaint.json()["error"]["message"]  # it names the model that cannot
    assert answer.status_code == 200, answer.text
    generate(compose([*COMPUTE, f"model={model}", "prompt=a blue square", "width=64",
                      "height=48", "steps=3", "seed=5", "guidance_scale=3.5",
                      "pipeline.progress=false"]), tmp_path / "run")
    (served,), (made,) = images_of(answer.json()), read_images(tmp_path / "run")
    assert served.shape == (48, 64, 3) and np.array_equal(served, made)


@pytest.mark.slow
def test_a_compiled_cached_instance_compiles_before_ready_and_counts_cache_hits(
        tmp_path: Path) -> None:
    """Compile and a step cache by config: the instance compiles during its warm-up (at a
    request's default size and steps), before /readyz answers, so the first request compiles
    nothing new; the cache's reused steps are counted in its metrics; the image equals the run's
    with the same settings."""
    from paraflow.compile import compile_counts

    policy = ["pipeline.stages.denoise.compile=regional",
              "pipeline.stages.denoise.compile_options.backend=eager",
              "pipeline.stages.denoise.cache=first_block",
              "pipeline.stages.denoise.cache_options.threshold=0.5"]
    app = build([*INSTANCE, "serve.instance.warmup=true", "serve.limits.max_steps=4",
                 *policy])[1]
    with TestClient(app) as served:
        assert served.get("/readyz").status_code == 200
        assert counter(app, "paraflow_warmup_seconds") > 0
        warm = compile_counts()
        assert warm["graphs"] > 0 and warm["graph_breaks"] == {}
        answer = served.post(URL, json={"prompt": "a red circle", "seed": 3, "steps": 4,
                                        "guidance_scale": 5.0})
        assert answer.status_code == 200, answer.text
        assert compile_counts()["graphs"] == warm["graphs"]  # nothing compiled on request
        reused = counter(app, "paraflow_reused_steps_total")
        full = counter(app, "paraflow_denoiser_calls_total")
    assert reused > 0 and full > 0
    generate(compose([*COMPUTE, *policy, "prompt=a red circle", "seed=3", "steps=4",
                      "guidance_scale=5.0", "pipeline.progress=false"]), tmp_path / "run")
    (image,), (made,) = images_of(answer.json()), read_images(tmp_path / "run")
    assert np.abs(image.astype(int) - made.astype(int)).max() <= 1
