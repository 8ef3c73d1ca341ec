"""The HTTP layer: the app factory, the one tile route, the FastAPI routes, the HTTP error table,
the audit log. The only layer that imports the web framework."""
