"""LoRA per request on one instance in-process (the tiny model): the instance loads two adapters
(serve.lora) once; requests with different adapters, waiting together, each give the image of a
run that loads just that LoRA (bit-identical: the same code path and threads); requests with the
same adapters batch, different ones do not; an unknown or malformed choice is a 400 naming the
field and listing the adapters; edits take adapters too. Rank groups: test_serve_lora_groups.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from paraflow.serve.instance import build
from paraflow.serve.jobs import Job
from paraflow.serve.requests import ImagesRequest, LoraChoice
from tests.serve_helpers import (
    INSTANCE,
    counter,
    decoded,
    images_of,
    picture,
    run_alone,
    served_lora,
)

URL, EDITS = "/v1/images/generations", "/v1/images/edits"  # `adapters`: tests/conftest.py


@pytest.fixture(scope="module")
def app(adapters: dict[str, Path]) -> Any:
    return build([*INSTANCE, served_lora(adapters)])[1]


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def test_requests_with_different_adapters_waiting_together_each_get_their_own(
        app: Any, adapters: dict[str, Path], tmp_path: Path) -> None:
    engine = app.state.engine
    blocker = threading.Event()
    first = Job(ImagesRequest(prompt="a", steps=2), 64, 64, 0,
                on_progress=lambda _: blocker.wait(30))
    cases = [  # (the request's adapters, the same LoRAs loaded alone)
        ([("ink", 0.8)], [(adapters["ink"], 0.8)]),
        ([("sky", 1.5)], [(adapters["sky"], 1.5)]),
        ([("ink", 0.8)], [(adapters["ink"], 0.8)]),  # batches with the first
        ([], []),
        ([("sky", 0.5), ("ink", 1.0)], [(adapters["sky"], 0.5), (adapters["ink"], 1.0)]),
    ]
    jobs = [Job(ImagesRequest(prompt="a red circle", steps=3,
                              lora=[LoraChoice(name=n, scale=s) for n, s in chosen]),
                64, 64, 10 + i) for i, (chosen, _) in enumerate(cases)]
    batches = counter(app, "paraflow_batches_total")
    futures = [engine.submit(job) for job in (first, *jobs)]
    blocker.set()
    served = [decoded(f.result(120)[0]) for f in futures[1:]]
    # first; ink 0.8 twice together; sky 1.5; none; sky + ink: adapters never share a batch
    assert counter(app, "paraflow_batches_total") - batches == 5
    for i, ((_, loras), image) in enumerate(zip(cases, served)):
        if i == 2:  # in a batch of two: float rounding only (as any batch of a run)
            alone = run_alone(tmp_path, loras, 10 + i).astype(int)
            assert np.abs(image.astype(int) - alone).max() <= 1, i
        else:
            assert np.array_equal(image, run_alone(tmp_path, loras, 10 + i)), i
    assert not np.array_equal(served[0], served[3])  # the adapter changes the image


@pytest.mark.parametrize("lora,needle", [
    ([{"name": "gold"}], "lora[0].name='gold': unknown; this instance's adapters are ink, sky"),
    ([{"name": "ink"}, {"name": "ink", "scale": 0.5}], "lora[1].name='ink': named twice"),
    ([{"name": "ink", "weight": 1}], "unknown field"),
    ([{"name": "ink", "scale": 99}], "less than or equal to 10"),
])
def test_a_bad_adapter_choice_is_a_400_naming_the_field(client: TestClient, lora: Any,
                                                        needle: str) -> None:
    answer = client.post(URL, json={"prompt": "x", "steps": 1, "lora": lora})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert needle in error["message"] and error["param"].startswith("lora"), error


def test_edits_take_adapters_and_the_instance_lists_them(client: TestClient) -> None:
    assert client.get("/v1/instance").json()["lora"] == ["ink", "sky"]
    image = {"image": ("in.png", picture(), "image/png")}
    form = {"prompt": "x", "steps": "2", "seed": "3", "strength": "0.6"}
    plain = client.post(EDITS, data=form, files=image)
    inked = client.post(EDITS, data={**form, "lora": '[{"name": "ink", "scale": 1.0}]'},
                        files=image)
    assert plain.status_code == inked.status_code == 200, inked.text
    assert not np.array_equal(images_of(plain.json())[0], images_of(inked.json())[0])
    bad = client.post(EDITS, data={**form, "lora": "ink"}, files=image)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora", bad.text
    unknown = client.post(EDITS, data={**form, "lora": '[{"name": "gold"}]'}, files=image)
    assert unknown.status_code == 400 and "adapters are ink, sky" in unknown.text


def test_an_instance_without_adapters_says_so(tmp_path: Path) -> None:
    with TestClient(build(INSTANCE)[1]) as plain:
        answer = plain.post(URL, json={"prompt": "x", "steps": 1, "lora": [{"name": "ink"}]})
        assert answer.status_code == 400
        assert "this instance loads none (serve.lora)" in answer.json()["error"]["message"]


def test_a_bad_adapter_stops_the_service_before_any_instance_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from paraflow.serve.__main__ import main

    code = main(["model=tiny_random", f"output_dir={tmp_path}",
                 "serve.lora=[{name:ink,path:/no/such/lora}]"])
    assert code == 2
    assert "model.adapters[0].path=/no/such/lora: no such file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written
