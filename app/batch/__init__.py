"""Batch work on whole pyramids: pregeneration jobs and workers (local pool, Dask), the walk
that plans them, static export, and the ``pregenerate``/``export`` commands."""
