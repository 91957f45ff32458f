"""The ``resnet-pipeline`` command: parse, call, print."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Batch image labeling with ResNet on Ray.")
weights_app = typer.Typer(no_args_is_help=True, help="Stage and inspect model weights.")
app.add_typer(weights_app, name="weights")
console = Console()
errors = Console(stderr=True)

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _architecture(depth: int) -> str:
    if depth not in DEPTHS:
        errors.print(f"[red]--depth must be one of {sorted(DEPTHS)}, got {depth}[/red]")
        raise typer.Exit(2)
    return DEPTHS[depth]


@app.command()
def demo(
    weights: str = typer.Option("imagenet", help="'imagenet', 'random', or a weights file path/URL."),
    depth: int = typer.Option(50, help="ResNet depth: 18, 34, 50, 101 or 152."),
    download_weights: bool = typer.Option(
        False, "--download-weights", help="Download Keras's ImageNet weights if they are not cached."
    ),
    top_k: int = typer.Option(5, min=1, max=20, help="Labels shown per image."),
) -> None:
    """Label the sample photographs that ship with scikit-learn and print the top labels."""
    _quiet_tensorflow()
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from pipeline.decode import fit
    from pipeline.model import WeightsError, caffe_preprocess, create_model, imagenet_labels

    try:
        model = create_model(_architecture(depth), weights=weights, allow_download=download_weights)
    except WeightsError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    info = model.weights_info
    if info.random:
        errors.print("[yellow]Random weights: the labels below are meaningless (a smoke test, not a result).[/yellow]")

    pixels = np.stack([fit(Image.fromarray(load_sample_image(name))) for name in SAMPLE_PHOTOS])
    scores = np.asarray(model(caffe_preprocess(pixels)))
    labels = imagenet_labels()
    table = Table(title=f"{model.name}, weights {info.source} (sha256 {info.fingerprint[:12]})")
    table.add_column("image")
    table.add_column(f"top-{top_k}")
    for name, row in zip(SAMPLE_PHOTOS, scores, strict=False):
        best = np.argsort(row)[::-1][:top_k]
        table.add_row(name, ", ".join(f"{labels[i].label} ({labels[i].wnid}) {row[i]:.3f}" for i in best))
    console.print(table)


@weights_app.command("fetch")
def weights_fetch(
    depth: int = typer.Argument(50, help="ResNet depth with published weights: 50, 101 or 152."),
    no_top: bool = typer.Option(False, "--no-top", help="The file without the classifier (features only)."),
) -> None:
    """Download Keras's ImageNet weights into this node's cache (md5-checked)."""
    from pipeline.model import WeightsError, imagenet_file

    try:
        path = imagenet_file(_architecture(depth), include_top=not no_top, allow_download=True)
    except WeightsError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    console.print(f"ImageNet weights for ResNet-{depth}: {path}")


@weights_app.command("where")
def weights_where() -> None:
    """Where weights are cached on this node (set RESNET_PIPELINE_CACHE to move it)."""
    from pipeline.model.weights import weights_cache_dir

    console.print(str(Path(weights_cache_dir())))


def main() -> None:
    app()
