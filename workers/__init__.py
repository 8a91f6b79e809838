"""The GPU worker: the Celery task bodies, the runner and its batcher, the engine process
that loads and runs the pipeline (spoken to through ``workers.protocol``), and the worker's
lifecycle. ``celery -A workers worker`` starts it."""
