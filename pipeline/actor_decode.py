"""Decoding in the model actor (``decode.on: actor``): compressed bytes in, a padded canvas of pixels out.

Read tasks ship the images' bytes, several times smaller than their decoded pixels. The actor decodes JPEGs with
NVIDIA nvImageCodec (on the GPU: nvJPEG's hardware engines where the GPU has them, its CUDA decoder otherwise; on
an actor without a GPU, its CPU backend), EXIF orientation applied. Each image is laid, unresized, into the corner
of a square canvas of one of a few sizes, with the box of it the model is to see (:func:`pipeline.decode.crop_box`):
the model's compiled forward pass resizes every box to the input size (:func:`pipeline.model.resize_boxes`), so the
shapes stay static and each canvas size is traced once.

What nvImageCodec is not given (PNG, WebP, GIF, TIFF, CMYK or 16-bit JPEGs, bytes it cannot parse, an image larger
than the largest canvas) is decoded in the actor by the CPU path of the read tasks (:func:`pipeline.decode.decode`):
the same orientation, modes, pixel limit and error reasons. Its output is already the model's size, laid in the
canvas with a box that resizes nothing.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.decode import DecodeError, Preprocessing, crop_box, decode

CANVAS_SIDES = (512, 1024, 2048)  # a batch goes to the smallest that holds all of its images


def nvimgcodec_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace at all
        return False


@dataclass
class DecodedBatch:
    """A batch decoded for :meth:`pipeline.predict.CompiledModel.from_canvas`: ``canvas`` ``[n, C, C, 3]`` uint8 (a
    NumPy array, or a device array on a GPU), ``boxes`` ``[n, 6]`` float32, the images' upright sizes (-1 where not
    decoded) and an error reason or None per image."""

    canvas: Any
    boxes: np.ndarray
    width: np.ndarray
    height: np.ndarray
    errors: list[str | None]


class ActorDecoder:
    """Decodes batches of image bytes with nvImageCodec, on the actor's GPU or, without one, on its CPU."""

    def __init__(self, preprocessing: Preprocessing, image_size: int, max_pixels: int, gpu: bool) -> None:
        from nvidia import nvimgcodec

        self.preprocessing, self.size, self.max_pixels, self.gpu = preprocessing, image_size, max_pixels, gpu
        self.nvimgcodec = nvimgcodec
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB)
        self._local = threading.local()  # a decoder per thread: an actor may run several batches at once
        self._decoder()  # made now, during the actor's start-up

    def _decoder(self):
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            nvimgcodec = self.nvimgcodec
            if self.gpu:
                decoder = nvimgcodec.Decoder()  # hardware engines, CUDA, then CPU: nvImageCodec's default order
            else:
                cpu = [nvimgcodec.Backend(nvimgcodec.CPU_ONLY)]
                decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=cpu)
            self._local.decoder = decoder
        return decoder

    def _parsed(self, data: bytes):
        """nvImageCodec's parse of ``data`` (its header, no pixels) if it is to decode it: an 8-bit gray or YCbCr
        JPEG within the pixel limit and the largest canvas; else None."""
        try:
            stream = self.nvimgcodec.CodeStream(data)
            takes = (
                stream.codec_name == "jpeg"
                and stream.precision == 8
                and stream.num_channels in (1, 3)
                and stream.width * stream.height <= self.max_pixels
                and max(stream.width, stream.height) <= CANVAS_SIDES[-1]
            )
        except Exception:  # not a header nvImageCodec can read: the CPU path says what is wrong with it
            return None
        return stream if takes else None

    def __call__(self, blobs: list[bytes]) -> DecodedBatch:
        n = len(blobs)
        width, height = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
        errors: list[str | None] = [None] * n
        images: dict[int, Any] = {}  # decoded whole, by nvImageCodec
        fitted: dict[int, np.ndarray] = {}  # decoded and resized by the CPU path
        streams = {i: stream for i, data in enumerate(blobs) if (stream := self._parsed(data)) is not None}
        on_gpu = list(streams)
        decoded = self._decoder().decode([streams[i] for i in on_gpu], params=self.params) if on_gpu else []
        for i, image in zip(on_gpu, decoded, strict=True):
            if image is not None:
                images[i] = image
                height[i], width[i] = image.shape[:2]
        for i in range(n):
            if i in images:
                continue
            try:
                fitted[i], width[i], height[i] = decode(blobs[i], self.preprocessing, self.max_pixels, self.size)
            except DecodeError as error:
                errors[i] = str(error)
            except Exception as error:  # a bad image is a row with a reason, never a dead actor
                errors[i] = f"{type(error).__name__}: {error}"
        longest = max([self.size, *(max(image.shape[:2]) for image in images.values())])
        side = next(side for side in CANVAS_SIDES if side >= longest)
        boxes = np.zeros((n, 6), np.float32)
        for i in images:
            boxes[i] = (*crop_box(int(width[i]), int(height[i]), self.preprocessing, self.size), width[i], height[i])
        for i in fitted:
            boxes[i] = (0, 0, self.size, self.size, self.size, self.size)
        canvas = (self._gpu_canvas if self.gpu else self._host_canvas)(n, side, images, fitted)
        return DecodedBatch(canvas, boxes, width, height, errors)

    @staticmethod
    def _host_canvas(n: int, side: int, images: dict[int, Any], fitted: dict[int, np.ndarray]) -> np.ndarray:
        canvas = np.zeros((n, side, side, 3), np.uint8)
        for i, image in images.items():
            pixels = np.asarray(image)
            canvas[i, : pixels.shape[0], : pixels.shape[1]] = pixels
        for i, pixels in fitted.items():
            canvas[i, : pixels.shape[0], : pixels.shape[1]] = pixels
        return canvas

    @staticmethod
    def _gpu_canvas(n: int, side: int, images: dict[int, Any], fitted: dict[int, np.ndarray]):
        """The canvas in GPU memory: the decoded images never go to the host (CuPy reads nvImageCodec's images
        through ``__cuda_array_interface__``; the model takes the canvas through DLPack)."""
        import cupy

        canvas = cupy.zeros((n, side, side, 3), cupy.uint8)
        for i, image in images.items():
            pixels = cupy.asarray(image)
            canvas[i, : pixels.shape[0], : pixels.shape[1]] = pixels
        for i, pixels in fitted.items():
            canvas[i, : pixels.shape[0], : pixels.shape[1]] = cupy.asarray(pixels)
        return canvas
