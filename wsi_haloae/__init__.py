"""wsi-haloae: HaloAE anomaly detection for whole-slide images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-haloae")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
