"""Decoding in the model actor (``decode.on: actor``) on nvImageCodec's CPU backend, as CI runs it: the same rows,
statuses and sizes as decoding in CPU tasks, pixels within Pillow's rounding, and embeddings that match."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.actor_decode import CANVAS_SIDES, ActorDecoder
from pipeline.decode import crop_box, decode
from pipeline.samples import write_samples

MAX_PIXELS = 89_478_485


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, bytes]:
    """The demo's sample set: the shipped photos in every format and mode, and the broken files."""
    paths = write_samples(tmp_path_factory.mktemp("samples"))
    return {path.name: path.read_bytes() for path in sorted(paths)}


def on_tasks(data: bytes, preprocessing: str, size: int):
    try:
        pixels, width, height = decode(data, preprocessing, MAX_PIXELS, size)
        return pixels, width, height, None
    except Exception as error:
        return None, -1, -1, str(error)


@pytest.mark.parametrize("preprocessing", ["crop", "squash"])
def test_the_actor_decodes_as_the_tasks_do(samples, preprocessing):
    from pipeline.model import resize_boxes

    size = 224  # smaller sizes let the tasks decode JPEGs at 1/2 scale (libjpeg's draft mode); the actor never does
    decoded = ActorDecoder(preprocessing, size, MAX_PIXELS, gpu=False)(list(samples.values()))
    assert decoded.canvas.shape[1:] == (CANVAS_SIDES[1], CANVAS_SIDES[1], 3)  # 640x427 photos: the 1,024 canvas
    pixels = np.asarray(resize_boxes(decoded.canvas, decoded.boxes, size))
    compared = 0
    for i, (name, data) in enumerate(samples.items()):
        expected, width, height, error = on_tasks(data, preprocessing, size)
        assert decoded.errors[i] == error, name  # the same reason, word for word
        assert (decoded.width[i], decoded.height[i]) == (width, height), name  # upright, EXIF applied
        if error is None:
            difference = np.abs(pixels[i] - expected.astype(np.float32))
            # JPEGs: nvImageCodec's decoder and the in-graph resize; everything else: the tasks' own pixels
            limit = 0.25 if name.endswith(".jpg") and "cmyk" not in name else 0.0
            assert difference.mean() <= limit, (name, difference.mean())
            assert difference.max() <= 2, name
            compared += 1
    assert compared == 28


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(samples):
    data = samples["china-photo.jpg"]
    decoded = ActorDecoder("crop", 64, 640 * 427 - 1, gpu=False)([data])
    assert decoded.errors == ["too large: 640x427 is over the limit of 273279 pixels"]


@pytest.mark.parametrize("preprocessing", ["crop", "squash"])
@pytest.mark.parametrize(("width", "height"), [(640, 427), (427, 640), (97, 301), (1000, 1000), (50, 40)])
def test_resize_boxes_is_pillows_bilinear(preprocessing, width, height):
    from PIL import Image

    from pipeline.decode import fit
    from pipeline.model import resize_boxes

    size = 64
    rng = np.random.default_rng(width * height)
    image = rng.integers(0, 256, (height, width, 3), np.uint8)
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))  # some smoothness
    canvas = np.zeros((1, 1024, 1024, 3), np.uint8)
    canvas[0, :height, :width] = image
    boxes = np.array([[*crop_box(width, height, preprocessing, size), width, height]], np.float32)
    resized = np.asarray(resize_boxes(canvas, boxes, size))[0]
    expected = fit(Image.fromarray(image), preprocessing, size).astype(np.float32)
    # Pillow also shrinks by 3x or more in integer steps first (reducing_gap) and rounds between its two passes
    assert np.abs(resized - expected).mean() < (1.0 if max(width, height) / size > 6 else 0.35)


@pytest.mark.slow
def test_a_run_decoding_in_the_actor_matches_a_run_decoding_in_tasks(samples, tmp_path):
    """The pipeline end to end, both ways, on a real local Ray cluster: one row per input with the same statuses,
    errors and sizes, and each image's embedding nearest to its own counterpart."""
    import ray

    from pipeline.query import connect
    from pipeline.runner import run
    from pipeline.spec import parse_spec

    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in samples.items():
        (folder / name).write_bytes(data)
    rows = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        for on in ("tasks", "actor"):
            overrides = ["model.depth=18", "model.weights=random", "model.seed=5", f"decode.on={on}"]
            output = str(tmp_path / on)
            run(parse_spec({"input": str(folder), "output": output}, overrides), progress=False)
            with connect(output) as db:
                found = db.execute(
                    "SELECT image_id, status, error, width, height, embedding FROM latest ORDER BY image_id"
                ).fetchall()
            rows[on] = {row[0]: row[1:] for row in found}
    finally:
        ray.shutdown()
    assert rows["actor"].keys() == rows["tasks"].keys() and len(rows["tasks"]) == len(samples)
    for image_id, (status, error, width, height, _) in rows["tasks"].items():
        assert rows["actor"][image_id][:4] == (status, error, width, height), image_id
    ok = [image_id for image_id, row in rows["tasks"].items() if row[0] == "ok"]
    tasks = np.array([rows["tasks"][i][4] for i in ok])
    actor = np.array([rows["actor"][i][4] for i in ok])
    mean = tasks.mean(axis=0)
    tasks, actor = tasks - mean, actor - mean
    tasks /= np.linalg.norm(tasks, axis=1, keepdims=True)
    actor /= np.linalg.norm(actor, axis=1, keepdims=True)
    similarity = actor @ tasks.T  # [actor image, tasks image]
    own = np.diag(similarity)
    # Nearest to its own counterpart; ties are pictures the sample set holds twice (PNG, BMP, TIFF of one photo).
    assert (own >= similarity.max(axis=1) - 1e-6).all(), [ok[i] for i in np.flatnonzero(own < similarity.max(1))]
    print(f"cosine similarity to the tasks' embedding after centring: min {own.min():.5f}, mean {own.mean():.5f}")
    assert own.min() > 0.99
