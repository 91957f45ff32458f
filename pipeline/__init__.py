"""resnet-pipeline: batch image labeling with ResNet on Ray."""

__version__ = "0.1.0"
