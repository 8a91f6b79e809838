"""``GET /openapi.json``: the API described as OpenAPI 3.1, the request schema generated
from the same pydantic model that validates it."""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.services import services
from tasks.request import RequestBounds, request_model
from tasks.views import JobView

bp = Blueprint("openapi", __name__)

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        }
    },
}


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def spec() -> dict:
    request = request_model(RequestBounds.of(services().settings))
    return {
        "openapi": "3.1.0",
        "info": {"title": "diffusion-fleet", "version": "1"},
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit an image-generation job",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}},
                    },
                    "responses": {
                        "202": {
                            "description": "Accepted; poll the Location",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}},
                        },
                        "400": _error("Malformed JSON"),
                        "413": _error("Body too large"),
                        "415": _error("Not JSON"),
                        "422": _error("Invalid field"),
                        "503": _error("Broker or job store unavailable"),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "A job's state, timings and, once succeeded, presigned image URLs",
                    "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": "The job",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}},
                        },
                        "404": _error("Unknown or expired job"),
                    },
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: broker, job store and storage reachable",
                    "responses": {"200": {"description": "ready"}, "503": _error("A dependency is down")},
                }
            },
        },
        "components": {"schemas": {**_schemas(JobRequest=request, Job=JobView), "Error": _ERROR}},
    }


def _schemas(**models) -> dict:
    """The models' JSON schemas, with the models they use as components of their own."""
    schemas: dict = {}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return schemas


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(spec())
