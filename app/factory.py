"""``create_app``: wires settings, job store, storage and the Celery producer into Flask."""

from __future__ import annotations

from typing import Any

from flask import Flask

from app import docs, errors, health, jobs, logs, metrics, models, openai_images, openapi, playground, webhooks
from app.services import make_services
from tasks.settings import get_settings


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """``test_config`` may carry ``SETTINGS`` (a ``Settings``) and ``SERVICES`` to wire in."""
    app = Flask(__name__, static_folder=None)  # it serves no files of its own (/docs serves Swagger UI's)
    test_config = dict(test_config or {})
    settings = test_config.pop("SETTINGS", None) or get_settings()
    services = test_config.pop("SERVICES", None) or make_services(settings)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.config.update(test_config)
    app.extensions["fleet"] = services

    errors.register(app)
    logs.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(openai_images.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(playground.bp)
    app.register_blueprint(webhooks.bp)
    metrics.register(app, services)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(docs.bp)
    return app
