"""``GET /v1/webhooks/secret``: the secret the caller's webhook deliveries are signed with
(Standard Webhooks, ``whsec_...``; docs/WEBHOOKS.md shows how to verify one)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.auth import owner, require_key
from app.openapi import operation, response
from app.services import services
from tasks.webhooks import webhook_secret

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
_SECRET = {
    "type": "object",
    "required": ["key", "secret"],
    "properties": {"key": {"type": "string"}, "secret": {"type": "string", "pattern": "^whsec_"}},
}
require_key(bp)


@bp.get("/secret")
@operation(
    "The secret your webhooks are signed with",
    tag="webhooks",
    responses={200: response("Your key's name and its whsec_ secret", _SECRET)},
)
def secret():
    return jsonify({"key": owner(), "secret": webhook_secret(services().settings, owner())})
