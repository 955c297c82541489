"""Dataset-scale evaluation: files in, one row per pair out, streaming, never losing a row.

- ``data``: listing and decoding image files, pair specs, size buckets, windows.
- ``options``: ``EvalOptions``, every knob of a run, validated once.
- ``feature_cache``: the on-disk, size-bounded feature store.
- ``features``: ``FeatureSource``, decode -> cache -> trunk, one batch at a time.
- ``evaluate``: paired, one-vs-many and listed-pair runs (resume, ranks, writers).
- ``pairwise`` / ``diversity``: all-pairs distances as GEMMs over unit features.
- ``writers``: CSV/JSONL rows, stats, settings next to the output, resume.
- ``distributed``: sharding windows across ranks.
- ``heatmap``: the spatial map of one pair as an image.

Importing this package imports none of them.
"""
