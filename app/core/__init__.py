"""The core: DZI geometry, slide reading (OpenSlide, native TIFF), colour, formats and encoders,
the tile planner, domain errors. No web framework, no caches, no processes."""
