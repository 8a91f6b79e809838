"""``GET /docs``: Swagger UI over ``/openapi.json``, served from this process alone.

The page loads nothing from a CDN: its script and stylesheet are the Swagger UI build the
``flask-swagger-ui`` package ships, served here from the installed package (only the
files the page uses). Swagger UI's online validator badge is off, so opening the page
sends nothing anywhere either.
"""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, Response, url_for

from app.assets import serve_assets
from app.openapi import operation, response

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


serve_assets(bp, _DIST, ASSETS, "documentation", max_age=3600)
