"""wsi-tileserver: an async DeepZoom tile server for whole-slide images (OpenSlide + FastAPI)."""

__version__ = "0.1.0"
