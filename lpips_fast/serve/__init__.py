"""The HTTP service (``lpips-fast serve``): an ASGI app over ``lpips_fast.Scorer``.

``app.create_app(settings)`` builds the FastAPI app; ``lpips_fast.cli.serve`` registers the
``serve`` and ``config`` commands. Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart,
prometheus-client); importing this package alone imports none of them.
"""
