"""The HTTP API. ``create_app()`` is the WSGI entry point: ``gunicorn "app:create_app()"``."""

from app.factory import create_app

__all__ = ["create_app"]
