"""``GET /playground``: a page to try the fleet from a browser.

Pick a model, scheduler, steps and size from the registry (``GET /v1/models``), submit,
watch the place in line and each step live, see the images as they arrive and download
them. It is a client of the public API like any other (same key, same endpoints), three
static files with no build step, and it loads nothing from anywhere but this fleet.
"""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, send_from_directory

from app.assets import serve_assets
from app.openapi import operation, response

bp = Blueprint("playground", __name__, url_prefix="/playground")

#: The page's files and their media types.
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
_STATIC = str(files("app") / "static")


@bp.get("")
@operation(
    "A page to try the fleet from a browser (it asks for your API key)",
    tag="meta",
    responses={200: response("The page", {"type": "string"}, media="text/html")},
)
def page():
    return send_from_directory(_STATIC, "playground.html", mimetype="text/html", max_age=0)


serve_assets(bp, _STATIC, ASSETS, "playground", max_age=0)
