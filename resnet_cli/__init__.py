"""resnet-cli: train residual networks from the command line."""

from .models import build_model

__all__ = ["build_model"]
__version__ = "0.1.0"
