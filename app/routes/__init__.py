"""HTTP routes: DZI and tiles, the JSON API, and the viewer pages."""
