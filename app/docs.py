"""``GET /docs``: Swagger UI over ``/openapi.json``, served from this process alone.

The page loads nothing from a CDN: its script and stylesheet are the Swagger UI build the
``flask-swagger-ui`` package ships, served here from the installed package (only the
files the page uses). Swagger UI's online validator badge is off, so opening the page
sends nothing anywhere either.
"""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, Response, send_from_directory, url_for
from werkzeug.exceptions import NotFound

from app.openapi import ERROR, operation, response

bp = Blueprint("docs", __name__, url_prefix="/docs")

#: The build's files the page uses, and their media types.
ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_DIST = str(files("flask_swagger_ui") / "dist")

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>diffusion-fleet API</title>
  <link rel="stylesheet" href="{css}">
  <link rel="icon" type="image/png" href="{icon}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{js}"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "{spec}",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout"
    }});
  </script>
</body>
</html>
"""


@bp.get("")
@operation(
    "Interactive documentation (Swagger UI) of this API",
    tag="meta",
    responses={200: response("The page", {"type": "string"}, media="text/html")},
)
def page():
    html = _PAGE.format(
        css=url_for("docs.asset", name="swagger-ui.css"),
        icon=url_for("docs.asset", name="favicon-32x32.png"),
        js=url_for("docs.asset", name="swagger-ui-bundle.js"),
        spec=url_for("openapi.openapi_json"),
    )
    return Response(html, mimetype="text/html")


@bp.get("/<name>")
@operation(
    "A file of the documentation page",
    tag="meta",
    parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": list(ASSETS)}}],
    responses={
        200: {"description": "The file", "content": {media: {} for media in ASSETS.values()}},
        404: response("Not a file of the page", ERROR),
    },
)
def asset(name: str):
    if name not in ASSETS:
        raise NotFound(f"no documentation file '{name}'")
    return send_from_directory(_DIST, name, mimetype=ASSETS[name], max_age=3600)
