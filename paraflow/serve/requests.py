"""The request bodies of `POST /v1/images/generations` and `/v1/images/edits`: OpenAI's images
API (`prompt`, `n`, `size` "WxH", `response_format`) plus paraflow's fields, checked before
anything reaches a device (an edit's uploaded files: uploads.py).

Types, ranges and unknown fields are pydantic's (`extra="forbid"`); what depends on the served
model and rank group (a size the bands cannot split, a scheduler this instance does not offer) is
checked against the instance (`ServedLimits.check`), then by the same `validate` a run passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class LoraChoice(BaseModel):
    """One of the instance's adapters (serve.lora) for this request, at a scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=-10.0, le=10.0)  # beyond ±10 is a typo, not a LoRA


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    size: str = "64x64"  # "WIDTHxHEIGHT"
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None  # accepted for client compatibility; must name the served model
    user: str | None = None  # OpenAI's end-user tag, kept in the logs only
    negative_prompt: str | None = None
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=5.0, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    scheduler: str | None = None  # one of the instance's (serve.limits.schedulers)
    stream: bool = False  # server-sent events: one `progress` per step, then `result`
    lora: list[LoraChoice] = Field(default_factory=list)  # adapters on for this request


class EditRequest(ImagesRequest):
    """An edit's form fields (multipart: every value arrives as a string). `size` "auto": the
    uploaded image's size."""

    size: str = "auto"
    strength: float | None = Field(default=None, gt=0.0, le=1.0)  # None: the pipeline's


class RequestError(ValueError):
    """A request that must not run: the field and what is allowed (answered 4xx)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def parse(body: Any) -> ImagesRequest:
    """The body as a request, or RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("body", "the body must be a JSON object")
    try:
        return ImagesRequest.model_validate(body)
    except ValidationError as err:
        raise _first(err, list(ImagesRequest.model_fields)) from None


def parse_form(fields: dict[str, str], files: tuple[str, ...]) -> EditRequest:
    """An edit's string fields as a request (pydantic's string parsing: "3" is an int, "true"
    a bool), or RequestError naming the first bad field; `files`: the form's file fields. The
    form's `lora` is JSON, as a generation's: '[{"name": "ink", "scale": 0.8}]'."""
    fields = dict(fields)
    lora = fields.pop("lora", None)
    try:
        request = EditRequest.model_validate_strings(fields)
    except ValidationError as err:
        raise _first(err, [*files, *EditRequest.model_fields]) from None
    if lora is not None:
        try:
            request.lora = CHOICES.validate_json(lora)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in ("lora", *first["loc"]))
            raise RequestError("lora", f"{where}: {first['msg']} (a JSON list of "
                                       '{"name": ..., "scale": ...})') from None
    return request


CHOICES = TypeAdapter(list[LoraChoice])


def _first(err: ValidationError, allowed: list[str]) -> RequestError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown field; the fields are: {', '.join(allowed)}"
    return RequestError(field, f"{field}: {message}")


@dataclass(frozen=True)
class ServedLimits:
    """What this instance can run: the model's size multiple and the configured bounds."""

    model: str
    multiple: int  # pixels: the VAE's downsampling × the denoiser's (and the bands')
    max_side: int
    max_images: int
    max_steps: int
    max_prompt_chars: int
    schedulers: tuple[str, ...]
    adapters: tuple[str, ...] = ()  # serve.lora's names

    def check(self, request: ImagesRequest) -> tuple[int, int]:
        """(width, height) of a request this instance can run, or RequestError."""
        if request.model is not None and request.model != self.model:
            raise RequestError("model", f"model={request.model!r}: this service runs "
                                        f"{self.model!r}")
        if request.n > self.max_images:
            raise RequestError("n", f"n={request.n}: at most {self.max_images} images per "
                                    "request")
        if request.steps > self.max_steps:
            raise RequestError("steps", f"steps={request.steps}: at most {self.max_steps}")
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name) or ""
            if len(text) > self.max_prompt_chars:
                raise RequestError(name, f"{name}: {len(text)} characters, at most "
                                         f"{self.max_prompt_chars}")
        if request.scheduler is not None and request.scheduler not in self.schedulers:
            raise RequestError("scheduler", f"scheduler={request.scheduler!r}: one of "
                                            f"{', '.join(self.schedulers)}")
        self._check_lora(request)
        match = SIZE.match(request.size)
        if match is None:
            raise RequestError("size", f"size={request.size!r}: write it WIDTHxHEIGHT, e.g. "
                                       f"'{self.multiple * 8}x{self.multiple * 8}'")
        width, height = int(match[1]), int(match[2])
        for side, value in (("width", width), ("height", height)):
            if not self.multiple <= value <= self.max_side or value % self.multiple:
                raise RequestError("size", f"size={request.size!r}: the {side} must be a "
                                           f"multiple of {self.multiple} from {self.multiple} "
                                           f"to {self.max_side}")
        return width, height

    def _check_lora(self, request: ImagesRequest) -> None:
        names = [choice.name for choice in request.lora]
        for index, name in enumerate(names):
            if name not in self.adapters:
                known = (f"this instance's adapters are {', '.join(self.adapters)}"
                         if self.adapters else "this instance loads none (serve.lora)")
                raise RequestError("lora", f"lora[{index}].name={name!r}: unknown; {known}")
            if name in names[:index]:
                raise RequestError("lora", f"lora[{index}].name={name!r}: named twice")
