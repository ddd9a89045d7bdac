"""The form of `POST /v1/images/edits` (multipart/form-data, as OpenAI's images API sends it):
read within the body limit, split into its files and its text fields, and the files checked —
decodable images, sides within the instance's limit, a mask of the image's size — before
anything reaches a device. Each problem is a RequestError naming the field.

A mask is paraflow's, white where the image is repainted and black where it is kept (as a run's
`mask=PATH`), or OpenAI's, transparent where it is repainted: a mask with transparent pixels is
made the black and white one it means.
"""

from __future__ import annotations

import io

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from paraflow.serve.jobs import Uploads
from paraflow.serve.requests import EditRequest, RequestError, ServedLimits

FILES = ("image", "mask")
MAX_PARTS = 64  # form parts of either kind; the body limit bounds their bytes


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form(request: Request, raw: bytes,
                    limit: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form's text fields and its files (image, mask) by name; `raw`: the body, already
    read within `limit`."""
    kind = content_type(request)
    if kind != "multipart/form-data":
        raise RequestError("content-type", f"content-type {kind or 'missing'}: send "
                                           "multipart/form-data", 415)
    request._body = raw  # starlette's form() parses the cached body, not the spent stream
    try:  # starlette's limits, no lower than the body's (its part limit is 1 MB otherwise)
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=limit)
    except (HTTPException, MultiPartException) as err:
        detail = err.detail if isinstance(err, HTTPException) else err.message
        raise RequestError("body", f"not a readable multipart form: {detail}") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if name in fields or name in files:
                raise RequestError(name, f"{name}: given more than once; give it once")
            if isinstance(value, str):
                fields[name] = value
            else:
                files[name] = await value.read()
    finally:
        await form.close()
    for name in files:
        if name not in FILES:
            raise RequestError(name, f"{name}: unknown file field; the files are "
                                     f"{', '.join(FILES)}")
    for name in FILES:
        if name in fields:
            raise RequestError(name, f"{name}: must be a file (a form part with a filename), "
                                     "not a text field")
    if "image" not in files:
        raise RequestError("image", "image: required, the image to edit (a file)")
    return fields, files


def opened(field: str, data: bytes, max_side: int) -> Image.Image:
    """The image uploaded as `field`, decoded; its sides checked before its pixels are."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(field, f"{field}: not an image (send PNG, JPEG or WebP bytes)") \
            from None
    except Exception as err:  # PIL raises many kinds for bytes that are no image
        raise RequestError(field, f"{field}: not a readable image ({err})") from None
    width, height = image.size
    if max(width, height) > max_side:
        raise RequestError(field, f"{field}: {width}x{height}; the sides must be at most "
                                  f"{max_side} pixels")
    try:
        image.load()
    except Exception as err:  # truncated or corrupt pixel data
        raise RequestError(field, f"{field}: not a readable image ({err})") from None
    return image


def paraflow_mask(mask: Image.Image, data: bytes) -> bytes:
    """`data` as paraflow reads masks: as is, or white where OpenAI's mask is transparent."""
    if mask.mode not in ("RGBA", "LA", "PA") and "transparency" not in mask.info:
        return data
    alpha = mask.convert("RGBA").getchannel("A")
    if alpha.histogram()[0] == 0:  # nothing fully transparent: its grey levels are the mask
        return data
    out = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(out, format="PNG")
    return out.getvalue()


def checked_files(files: dict[str, bytes], max_side: int) -> tuple[Uploads, tuple[int, int]]:
    """The uploads of a form (read_form) and the image's (width, height)."""
    image = opened("image", files["image"], max_side)
    mask = None
    if "mask" in files:
        opened_mask = opened("mask", files["mask"], max_side)
        if opened_mask.size != image.size:
            (mw, mh), (w, h) = opened_mask.size, image.size
            raise RequestError("mask", f"mask: {mw}x{mh}, but the image is {w}x{h}; give a "
                                       "mask of the image's size")
        mask = paraflow_mask(opened_mask, files["mask"])
    return Uploads(files["image"], mask), image.size


def sized(request: EditRequest, image: tuple[int, int],
          limits: ServedLimits) -> tuple[EditRequest, int, int]:
    """The request checked against the instance (ServedLimits.check), size "auto" made the
    image's size where this instance can make that size."""
    if request.size != "auto":
        return (request, *limits.check(request))
    auto = request.model_copy(update={"size": f"{image[0]}x{image[1]}"})
    try:
        return (auto, *limits.check(auto))
    except RequestError as err:
        if err.field != "size":
            raise
        raise RequestError("size", f"size=auto: the image is {auto.size}, a size this instance "
                                   f"cannot make; give size=WIDTHxHEIGHT, each side a multiple "
                                   f"of {limits.multiple} from {limits.multiple} to "
                                   f"{limits.max_side} (the image is resized)") from None
