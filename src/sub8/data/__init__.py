from .images import ImageFolder, load_images

__all__ = ["ImageFolder", "load_images"]
