"""``GET /v1/models``: the models this fleet serves (``tasks.registry``), in OpenAI's shape.

Each entry is an OpenAI model object (``id``, ``object``, ``created``, ``owned_by``), so
the official client's ``models.list()`` and ``models.retrieve()`` work, with the fleet's own
fields beside them: whether it is the default, what a request may ask of it (sizes, steps,
schedulers), how its pool runs it (``dtype``, ``quantize``), and its state now: the live
workers that consume its queues and the jobs queued and running there.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.auth import require_key
from app.openapi import ERROR, errors, operation, ref, response
from app.services import Services, services
from tasks.catalog import ModelList, ModelState, ModelView, QueueState
from tasks.errors import NotFound
from tasks.registry import Model
from tasks.schedulers import SCHEDULERS

bp = Blueprint("models", __name__, url_prefix="/v1/models")
require_key(bp)


@bp.get("")
@operation(
    "The models this fleet serves, with their state",
    tag="models",
    keyed=True,
    description="OpenAI's list shape (`object: list`, `data`), each model with the fleet's fields beside OpenAI's.",
    responses={200: response("The models", ref("schemas", "ModelList")), **errors(503)},
)
def list_models():
    svc = services()
    return jsonify(
        ModelList(data=[_view(svc, model) for model in svc.registry.models.values()]).model_dump(mode="json")
    )


@bp.get("/<name>")
@operation(
    "One model and its state",
    tag="models",
    keyed=True,
    parameters=[
        {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "The model's name, as `GET /v1/models` lists it.",
            "schema": {"type": "string"},
        }
    ],
    responses={
        200: response("The model", ref("schemas", "ModelView")),
        404: response("No such model (`not_found`, field `name`).", ERROR),
        **errors(503),
    },
)
def get_model(name: str):
    svc = services()
    if name not in svc.registry:
        raise NotFound(f"no model '{name}': GET /v1/models lists them", field="name")
    return jsonify(_view(svc, svc.registry.get(name)).model_dump(mode="json"))


def _view(svc: Services, model: Model) -> ModelView:
    queues = svc.registry.queues(model.name)
    backlog = svc.store.backlog(queues)
    workers = svc.store.live_workers(queues)
    fields = model.model_dump(exclude={"name", "path", "loras"})  # where it lives stays on the server
    if fields["schedulers"] is None:  # any: say which
        fields["schedulers"] = list(SCHEDULERS)
    fields["loras"] = list(model.adapters)
    return ModelView(
        id=model.name,
        default=model.name == svc.registry.default,
        **fields,
        state=ModelState(
            workers=len(set().union(*workers.values())),
            queues=[
                QueueState(name=queue, queued=backlog[queue][0], running=backlog[queue][1], workers=len(workers[queue]))
                for queue in queues
            ],
        ),
    )
