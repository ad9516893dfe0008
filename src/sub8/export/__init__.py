"""What a user deploys: the packed sub8 artifact and an ONNX QDQ graph."""

from .artifact import load, save

__all__ = ["load", "save"]
