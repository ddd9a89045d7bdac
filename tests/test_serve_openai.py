"""The service through OpenAI's own Python client, as a user's program calls it, against an
instance served over HTTP on loopback: the model list, a generation, an img2img edit and an
inpainting edit, each equal to `python -m paraflow`'s image for the same seed, size and steps;
an edit's progress as server-sent events; a refused upload as the client's error naming the
field; a rank group's edit equal to one device's; an SDXL base + refiner instance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from paraflow.api import compose, generate
from paraflow.serve.instance import build
from paraflow.serve.local import LocalService
from tests.conftest import REPO, read_images
from tests.serve_helpers import (
    COMPUTE,
    INSTANCE,
    images_of,
    picture,
    serving,
    square_mask,
)

PROMPT = "a red circle on the left"
RUN = [*COMPUTE, f"prompt={PROMPT}", "steps=3", "seed=5", "pipeline.progress=false"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serving(build(INSTANCE)[1]) as base:
        yield base


def client_of(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return client_of(url)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uploads, as files a user's program (and a run's image=PATH) would name."""
    folder = tmp_path_factory.mktemp("uploads")
    made = {"image": picture(), "mask": square_mask(), "openai_mask": square_mask(transparent=True)}
    for name, data in made.items():
        (folder / f"{name}.png").write_bytes(data)
    return {name: folder / f"{name}.png" for name in made}


def served(answer: Any) -> list[np.ndarray]:
    """The images of the client's ImagesResponse."""
    return images_of(answer.model_dump())


def edit(client: OpenAI, files: dict[str, Path], mask: str | None = None,
         **extra: Any) -> list[np.ndarray]:
    body = {"seed": 5, "steps": 3, **extra}
    if mask is None:
        return served(client.images.edit(image=files["image"], prompt=PROMPT, extra_body=body))
    return served(client.images.edit(image=files["image"], mask=files[mask], prompt=PROMPT,
                                     extra_body=body))


def test_the_model_list_names_the_served_model(client: OpenAI) -> None:
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("tiny_random", "model", "paraflow")
    assert client.models.retrieve("tiny_random").id == "tiny_random"


def test_a_generation_equals_the_run(client: OpenAI, tmp_path: Path) -> None:
    answer = client.images.generate(prompt=PROMPT, size="64x48", n=2,
                                    extra_body={"seed": 5, "steps": 3})
    generate(compose([*RUN, "width=64", "height=48", "images_per_prompt=2"]), tmp_path)
    for image, made in zip(served(answer), read_images(tmp_path), strict=True):
        assert image.shape == (48, 64, 3) and np.array_equal(image, made)  # same path, threads


def test_an_img2img_edit_equals_the_run(client: OpenAI, files: dict[str, Path],
                                        tmp_path: Path) -> None:
    (image,) = edit(client, files, strength=0.7)  # size: the image's
    generate(compose([*RUN, "pipeline=img2img", f"image={files['image']}", "strength=0.7"]),
             tmp_path)
    assert image.shape == (64, 64, 3) and np.array_equal(image, read_images(tmp_path)[0])


def test_an_inpainting_edit_equals_the_run(client: OpenAI, files: dict[str, Path],
                                           tmp_path: Path) -> None:
    (image,) = edit(client, files, mask="mask")
    generate(compose([*RUN, "pipeline=inpaint", f"image={files['image']}",
                      f"mask={files['mask']}"]), tmp_path)
    assert np.array_equal(image, read_images(tmp_path)[0])
    # OpenAI's kind of mask (transparent repaints) is the same black and white one
    assert np.array_equal(edit(client, files, mask="openai_mask")[0], image)


def test_an_edit_streams_its_steps_then_the_image(url: str, client: OpenAI,
                                                  files: dict[str, Path]) -> None:
    form = {"prompt": PROMPT, "seed": "5", "steps": "3", "stream": "true"}
    upload = {"image": ("image.png", files["image"].read_bytes(), "image/png"),
              "mask": ("mask.png", files["mask"].read_bytes(), "image/png")}
    events, kind = [], None
    with httpx.stream("POST", f"{url}/v1/images/edits", data=form, files=upload,
                      timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    assert [e["step"] for k, e in events if k == "progress"] == [1, 2, 3]  # strength 1
    assert events[-1][0] == "result"
    assert np.array_equal(images_of(events[-1][1])[0], edit(client, files, mask="mask")[0])


@pytest.mark.parametrize(("upload", "field"), [
    ({"image": ("image.png", b"not a picture", "image/png")}, "image"),
    ({"image": ("image.png", picture(), "image/png"),
      "mask": ("mask.png", square_mask(32, 32), "image/png")}, "mask"),
])
def test_a_refused_upload_is_the_client_s_error_naming_the_field(
        client: OpenAI, upload: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(prompt=PROMPT, **upload)
    assert refused.value.status_code == 400 and refused.value.param == field
    assert isinstance(refused.value.body, dict)
    assert str(refused.value.body["message"]).startswith(f"{field}:")


@pytest.mark.slow
def test_a_rank_group_s_edits_equal_one_device_s(client: OpenAI, files: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """sync_patch over two ranks (the VAE's encode and decode in bands, exact): latents within
    1e-4 of one device's, so pixels within 1 grey level."""
    group = LocalService(tmp_path / "group", 2, [*INSTANCE, "+strategy=sync_patch"], cwd=REPO,
                         ranks_per_instance=2)
    try:
        group.wait_ready()
        grouped = client_of(group.url)
        for mask, extra in ((None, {"strength": 0.7}), ("mask", {})):
            (image,) = edit(grouped, files, mask, **extra)
            (alone,) = edit(client, files, mask, **extra)
            assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1, mask
    finally:
        group.stop()


def test_an_sdxl_base_and_refiner_instance_serves_the_run_s_image(tmp_path: Path) -> None:
    refine = ["model=tiny_xl_random", *COMPUTE[1:], "pipeline=sdxl_refine",
              "model@pipeline.models.refiner=tiny_xl_refiner_random"]
    with serving(build([*refine, "serve.instance.warmup=false"])[1]) as base:
        assert [m.id for m in client_of(base).models.list().data] == ["tiny_xl_random"]
        answer = client_of(base).images.generate(prompt=PROMPT, size="64x64",
                                                 extra_body={"seed": 5, "steps": 3})
    generate(compose([*refine, f"prompt={PROMPT}", "steps=3", "seed=5",
                      "pipeline.progress=false"]), tmp_path)
    assert np.array_equal(served(answer)[0], read_images(tmp_path)[0])
