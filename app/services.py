"""The clients a request handler needs, built once per process by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from tasks.celery import make_celery
from tasks.events import EventHub
from tasks.keys import KeyRing
from tasks.notify import Notifier
from tasks.owners import Owners
from tasks.registry import Registry, load_registry
from tasks.settings import Settings
from tasks.storage import ObjectStorage, make_storage
from tasks.store import JobStore
from tasks.views import render


@dataclass
class Services:
    settings: Settings
    store: JobStore
    owners: Owners
    storage: ObjectStorage
    celery: Celery
    #: The process's one job-event subscription: what waiting requests sleep on.
    events: EventHub
    keys: KeyRing
    registry: Registry


def make_services(settings: Settings) -> Services:
    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=settings.publish_timeout_s, socket_timeout=5
    )
    store = JobStore(client, ttl_s=settings.job_ttl_s)
    storage, celery_app = make_storage(settings), make_celery(settings)
    Notifier(store, celery_app, settings, lambda job: render(job, storage))  # webhooks of what the API changes
    return Services(
        settings=settings,
        store=store,
        owners=Owners(client),
        storage=storage,
        celery=celery_app,
        events=EventHub(lambda: client),
        keys=KeyRing.parse(settings.api_keys, settings.api_key_file),
        registry=load_registry(settings),
    )


def services() -> Services:
    return current_app.extensions["fleet"]
