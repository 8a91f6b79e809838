"""The GPU worker: pipeline loading and running, the model thread, the Celery task bodies
and the worker's lifecycle. ``celery -A workers worker`` starts it."""
