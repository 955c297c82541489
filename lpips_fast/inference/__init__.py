"""Fast fixed-shape inference over the core module.

- ``engine``: ``Engine``, static buffers, CUDA-graph capture per shape, torch.compile, precisions.
- ``pipeline``: ``PinnedPipeline``, pooled pinned host buffers and side-stream copies.
- ``scorer``: ``Scorer``, a thread-safe micro-batching front for servers (bounded queue, metrics).
- ``telemetry``: the Scorer's metrics and JSON logs (Prometheus only when serving).

Importing this package imports none of them.
"""
