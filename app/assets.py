"""The static files a page of the API loads (``/docs``, ``/playground``), served from an
installed package: a route ``GET <prefix>/<name>`` for exactly the files named."""

from __future__ import annotations

from flask import Blueprint, send_from_directory
from werkzeug.exceptions import NotFound

from app.openapi import ERROR, operation, response


def serve_assets(bp: Blueprint, directory: str, assets: dict[str, str], page: str, max_age: int) -> None:
    """``GET <bp's prefix>/<name>`` for each file of ``assets`` (name -> media type) in
    ``directory``; any other name is a 404. ``page`` says whose files they are."""

    @bp.get("/<name>")
    @operation(
        f"A file of the {page}",
        tag="meta",
        parameters=[
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": list(assets)}}
        ],
        responses={
            200: {"description": "The file", "content": {media: {} for media in assets.values()}},
            404: response("Not a file of the page", ERROR),
        },
    )
    def asset(name: str):
        if name not in assets:
            raise NotFound(f"no {page} file '{name}'")
        return send_from_directory(directory, name, mimetype=assets[name], max_age=max_age)
