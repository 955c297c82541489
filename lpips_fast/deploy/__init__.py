"""Production: what a deployment needs around the metric.

- ``export``: ONNX and AOTInductor packages of a model, checked against eager.
- ``tune``: ``select_precision``, the fastest precision whose ranking agrees with fp32.
- ``comparison``: ``compare``, configurations scored side by side on one set of pairs.
- ``settings``: the layered settings (defaults < TOML < environment < flags) of the commands and
  the service, and their schema.

Importing this package imports none of them.
"""
