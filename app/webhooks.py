"""``GET /v1/webhooks/secret``: the secret the caller's webhook deliveries are signed with
(Standard Webhooks, ``whsec_...``; docs/WEBHOOKS.md shows how to verify one)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.auth import owner, require_key
from app.services import services
from tasks.webhooks import webhook_secret

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
require_key(bp)


@bp.get("/secret")
def secret():
    return jsonify({"key": owner(), "secret": webhook_secret(services().settings, owner())})
