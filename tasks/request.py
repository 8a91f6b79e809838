"""The body of ``POST /v1/jobs``: one pydantic model per configuration, carrying every bound.

``request_model(bounds)`` builds the model from the configured bounds (``RequestBounds``)
once per configuration. The API validates with it and the OpenAPI document shows its JSON
Schema, so the two cannot disagree: every request the document calls valid is accepted,
and every refusal names its field. The two rules a field's own schema cannot carry (the
pixel budget, and ``webhook_events`` needing a ``webhook``) are checked in
``_check_combination`` and written as JSON Schema beside it, in ``_combination_schema``.

Patterns are written for three regex engines at once (JSON Schema's ECMA dialect, Python's
``re`` that Hypothesis generates from, pydantic's Rust ``regex``): explicit character
classes with ``\\uXXXX`` escapes, no ``\\s``/``\\w``, no lookarounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from tasks.destinations import MAX_URL_CHARS, url_pattern
from tasks.errors import ValidationFailed
from tasks.registry import MAX_LORA_SCALE, MAX_LORAS, MIN_LORA_SCALE, Model, load_registry
from tasks.schedulers import SCHEDULERS, SchedulerName
from tasks.settings import ServiceClass, Settings

#: What a job's webhook may be sent for: it started, each step, it ended.
WebhookEvent = Literal["start", "progress", "completed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
#: Priorities within a queue, highest first where the broker orders by them.
MAX_PRIORITY = 9
MAX_SEED = 2**63 - 1
MAX_DEADLINE_MS = 3_600_000
MAX_GUIDANCE_SCALE = 50

#: C0 and C1 control characters, which no prompt needs (a NUL truncates strings in C code
#: downstream, an escape sequence rewrites a log reader's terminal); tab, line feed and
#: carriage return stay allowed: prompts are pasted text.
_CONTROL = r"\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F"
#: Blank: Unicode white space and the zero-width characters. A prompt of only these is
#: empty (the rule is this pattern, not ``str.strip()``, which would keep "\u200b").
_BLANK = r"\t\n\r \u00A0\u1680\u180E\u2000-\u200D\u2028\u2029\u202F\u205F\u2060\u3000\uFEFF"
PROMPT_PATTERN = f"^[{_BLANK}]*[^{_CONTROL}{_BLANK}][^{_CONTROL}]*$"
TEXT_PATTERN = f"^[^{_CONTROL}]*$"

_NO_CONTROL = "without control characters other than tab, line feed and carriage return"


def _whole(value: Any) -> Any:
    """JSON does not tell 64 from 64.0 and JSON Schema calls both integers, so a float
    without a fraction is the integer it equals; ``"64"``, ``true`` and ``64.5`` are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer as JSON has it: strict, but ``64.0`` is 64. A bounded one is written
#: ``Annotated[StrictInt, Field(ge=..., le=...), WHOLE]``: bounds before this validator, so
#: the JSON Schema carries them as keywords (and the annotation stays one a checker reads).
WHOLE = BeforeValidator(_whole)
WholeInt = Annotated[StrictInt, WHOLE]


class LoraRequest(BaseModel):
    """A LoRA adapter of the model (``GET /v1/models`` lists them) and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    scale: Annotated[float, Field(strict=True, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)] = Field(
        1.0, description="How strongly it applies: 1 as trained, 0 not at all, negative against it."
    )


def _loras_rule(names: tuple[str, ...]) -> str:
    if not names:
        return "an empty list or null: no model here has LoRA adapters"
    return (
        f"a list of at most {MAX_LORAS} objects {{name, scale}}: name one of {', '.join(names)}, "
        f"scale a number from {MIN_LORA_SCALE:g} to {MAX_LORA_SCALE:g}"
    )


class JobRequest(BaseModel):
    """The fields of a job request and the bounds no setting changes; ``request_model``
    adds the configured ones. Types are strict: ``"64"`` is not a width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: field -> what a valid value is, for its error message and its description.
    rules: ClassVar[dict[str, str]] = {
        "guidance_scale": f"a number from 0 to {MAX_GUIDANCE_SCALE}",
        "seed": f"an integer from 0 to {MAX_SEED}",
        "deadline_ms": f"an integer from 1 to {MAX_DEADLINE_MS}",
        "output_format": "one of png, webp, jpeg",
        "scheduler": f"one of {', '.join(SCHEDULERS)}",
        "output_quality": "an integer from 1 to 100",
        "service_class": "one of interactive, batch",
        "priority": f"an integer from 0 to {MAX_PRIORITY}",
        "webhook_events": f"a list of events among {', '.join(WEBHOOK_EVENTS)}",
    }

    prompt: StrictStr
    model: StrictStr | None = None
    negative_prompt: StrictStr | None = None
    width: WholeInt | None = None
    height: WholeInt | None = None
    steps: WholeInt | None = None
    scheduler: SchedulerName | None = Field(
        None,
        description="The sampler, a diffusers scheduler class made from the model's own config; null: the model's own.",
    )
    guidance_scale: Annotated[float, Field(strict=True, ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False)] | None = (
        Field(None, description="Classifier-free guidance; null: the configured default.")
    )
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED), WHOLE] | None = Field(
        None, description="Image i uses seed + i; null: a random seed (shown in the job)."
    )
    num_images: WholeInt = 1
    deadline_ms: Annotated[StrictInt, Field(ge=1, le=MAX_DEADLINE_MS), WHOLE] | None = Field(
        None, description="Best effort: a batch flushes early rather than miss it."
    )
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_quality: Annotated[StrictInt, Field(ge=1, le=100), WHOLE] | None = Field(
        None, description="webp and jpeg quality; null: the worker's default."
    )
    service_class: ServiceClass | None = Field(
        None, description="The queue: interactive (small batches, low latency) or batch; null: the configured default."
    )
    priority: Annotated[StrictInt, Field(ge=0, le=MAX_PRIORITY), WHOLE] | None = Field(
        None, description="Higher runs first within its queue; null: 0."
    )
    webhook: StrictStr | None = None
    webhook_events: list[WebhookEvent] | None = Field(
        None, description="Which events the webhook gets; needs a webhook; null: all of them."
    )
    loras: list[LoraRequest] | None = None


@dataclass(frozen=True)
class ModelBounds:
    """What one model of the registry accepts, and its default size."""

    name: str
    min_steps: int
    max_steps: int
    schedulers: tuple[SchedulerName, ...] | None  # None: any; (): only the model's own
    width: int
    height: int
    adapters: tuple[str, ...] = ()  # the LoRA adapters it has

    @classmethod
    def of(cls, model: Model) -> ModelBounds:
        return cls(
            model.name, model.min_steps, model.max_steps, model.schedulers, model.width, model.height, model.adapters
        )

    @property
    def loras_rule(self) -> str:
        if not self.adapters:
            return f"an empty list or null: model {self.name} has no LoRA adapters"
        return f"adapters of model {self.name}: {', '.join(self.adapters)}"

    @property
    def steps_rule(self) -> str:
        return f"an integer from {self.min_steps} to {self.max_steps} for model {self.name}"

    @property
    def scheduler_rule(self) -> str:
        if not self.schedulers:
            return f"null (the model's own) for model {self.name}"
        return f"one of {', '.join(self.schedulers)} or null for model {self.name}"


@dataclass(frozen=True)
class RequestBounds:
    """The settings a request is checked against: what ``request_model`` is built (and
    cached) from. The default size is the default model's."""

    max_prompt_chars: int
    max_side: int
    max_pixels: int
    max_steps: int
    max_images_per_job: int
    default_width: int
    default_height: int
    webhook_allow_private: bool
    models: tuple[ModelBounds, ...] = ()  # the default model first
    default_model: str = ""

    @classmethod
    def of(cls, settings: Settings) -> RequestBounds:
        registry = load_registry(settings)
        default = registry.get(None)
        models = tuple(ModelBounds.of(m) for m in sorted(registry.models.values(), key=lambda m: m is not default))
        return cls(
            max_prompt_chars=settings.max_prompt_chars,
            max_side=settings.max_side,
            max_pixels=settings.max_pixels,
            max_steps=max([settings.max_steps, *(m.max_steps for m in models)]),
            max_images_per_job=settings.max_images_per_job,
            default_width=default.width,
            default_height=default.height,
            webhook_allow_private=settings.webhook_allow_private,
            models=models,
            default_model=default.name,
        )

    def model(self, name: str | None) -> ModelBounds | None:
        """The bounds of model ``name`` (None: the default); None where there are none."""
        wanted = name or self.default_model
        return next((m for m in self.models if m.name == wanted), None)

    @property
    def largest_side(self) -> int:
        """The widest (or tallest) image any request can get: the configured side, or less
        where the pixel budget leaves no room for the other side's minimum of 8."""
        return min(self.max_side, self.max_pixels // 64 * 8)

    def tallest(self, width: int) -> int:
        """The largest height the pixel budget allows beside ``width``."""
        return min(self.largest_side, self.max_pixels // width // 8 * 8)


@lru_cache(maxsize=8)
def request_model(bounds: RequestBounds) -> type[JobRequest]:
    """``JobRequest`` with the configured bounds: the model the API validates with and the
    schema its OpenAPI document shows."""
    side, chars = bounds.largest_side, bounds.max_prompt_chars
    limits = {
        "prompt": f"a string of 1 to {chars} characters, not blank, {_NO_CONTROL}",
        "negative_prompt": f"a string of at most {chars} characters, {_NO_CONTROL}",
        "width": f"a multiple of 8 from 8 to {side}",
        "height": f"a multiple of 8 from 8 to {side}",
        "steps": f"an integer from 1 to {bounds.max_steps}",
        "num_images": f"an integer from 1 to {bounds.max_images_per_job}",
        "webhook": (
            f"an http:// or https:// URL of at most {MAX_URL_CHARS} printable ASCII characters with a host "
            + ("name or a literal IP address" if bounds.webhook_allow_private else "name (not a literal IP address)")
            + ", without credentials"
        ),
    }
    budget = f"Width x height must be at most {bounds.max_pixels} pixels."
    webhook_pattern = url_pattern(bounds.webhook_allow_private)

    class BoundedJobRequest(JobRequest):
        """An image-generation job. Types are strict ("64" is not a width); unknown fields
        are refused."""

        model_config = ConfigDict(title="JobRequest", json_schema_extra=_combination_schema(bounds))
        rules: ClassVar[dict[str, str]] = {**JobRequest.rules, **limits}

        prompt: Annotated[StrictStr, Field(min_length=1, max_length=chars, pattern=PROMPT_PATTERN)] = Field(
            description=f"What to draw: {limits['prompt']}."
        )
        negative_prompt: Annotated[StrictStr, Field(max_length=chars, pattern=TEXT_PATTERN)] | None = Field(
            None, description=f"What to steer away from: {limits['negative_prompt']}."
        )
        width: Annotated[StrictInt, Field(ge=8, le=side, multiple_of=8), WHOLE] | None = Field(
            None, description=f"Pixels: {limits['width']}; null: {bounds.default_width}. {budget}"
        )
        height: Annotated[StrictInt, Field(ge=8, le=side, multiple_of=8), WHOLE] | None = Field(
            None, description=f"Pixels: {limits['height']}; null: {bounds.default_height}. {budget}"
        )
        steps: Annotated[StrictInt, Field(ge=1, le=bounds.max_steps), WHOLE] | None = Field(
            None, description="Denoising steps; null: the configured default."
        )
        num_images: Annotated[StrictInt, Field(ge=1, le=bounds.max_images_per_job), WHOLE] = Field(
            1, description="Images of this prompt, each with its own seed."
        )
        webhook: Annotated[StrictStr, Field(max_length=MAX_URL_CHARS, pattern=webhook_pattern)] | None = Field(
            None, description=f"Where to POST signed events of this job: {limits['webhook']}."
        )

    names = tuple(m.name for m in bounds.models)
    if not names:
        return BoundedJobRequest
    adapters = tuple(sorted({a for m in bounds.models for a in m.adapters}))
    lora: type[LoraRequest] = LoraRequest
    if adapters:

        class Lora(LoraRequest):
            model_config = ConfigDict(title="LoraRequest")

            name: Literal[adapters] = Field(  # type: ignore[valid-type]  # the registry's adapters
                description="An adapter of the job's model (GET /v1/models lists each model's)."
            )

        lora = Lora
    loras_limit = MAX_LORAS if adapters else 0

    class ModelJobRequest(BoundedJobRequest):
        model_config = ConfigDict(title="JobRequest")
        rules: ClassVar[dict[str, str]] = {
            **BoundedJobRequest.rules,
            "model": f"one of {', '.join(names)}",
            "loras": _loras_rule(adapters),
        }

        model: Literal[names] | None = Field(  # type: ignore[valid-type]  # the registry's names
            None, description=f"The model (GET /v1/models): {', '.join(names)}; null: {bounds.default_model}."
        )
        loras: Annotated[list[lora], Field(max_length=loras_limit)] | None = Field(  # type: ignore[valid-type]
            None,
            description="LoRA adapters of the model to apply, each with its scale; an adapter named twice adds "
            "its scales; jobs batch together only with the same adapters and scales. null: none.",
        )

    return ModelJobRequest


def validate_request(body: Any, settings: Settings) -> JobRequest:
    """The request, checked against the configured bounds; ``ValidationFailed`` names the
    first offending field."""
    bounds = RequestBounds.of(settings)
    model = request_model(bounds)
    request = validate_body(body, model, model.rules)
    _check_combination(request, bounds)
    return request


Body = TypeVar("Body", bound=BaseModel)


def validate_body(body: Any, schema: type[Body], rules: dict[str, str] | None = None) -> Body:
    """``body`` checked against ``schema`` (the job's, or another route's), so every route
    refuses a body in the same words; ``rules`` says in words what each field must be."""
    if not isinstance(body, dict):
        raise ValidationFailed("the body must be a JSON object", field=None)
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            message = f"unknown field '{name}'"
        elif first["type"] == "missing":
            message = f"'{name}' is required"
        elif rules and name in rules:
            message = f"'{name}' must be {rules[name]}"
        else:
            message = f"'{name}': {first['msg']}"
        raise ValidationFailed(message, field=name) from None


def _check_combination(request: JobRequest, bounds: RequestBounds) -> None:
    """The rules that span two fields (``_combination_schema`` writes them as JSON Schema)."""
    model = bounds.model(request.model)
    if model is not None:
        if request.steps is not None and not model.min_steps <= request.steps <= model.max_steps:
            raise ValidationFailed(f"'steps' must be {model.steps_rule}", field="steps")
        if model.schedulers is not None and request.scheduler is not None and request.scheduler not in model.schedulers:
            raise ValidationFailed(f"'scheduler' must be {model.scheduler_rule}", field="scheduler")
        if any(lora.name not in model.adapters for lora in request.loras or ()):
            raise ValidationFailed(f"'loras' must name {model.loras_rule}", field="loras")
    width = (model.width if model else bounds.default_width) if request.width is None else request.width
    height = (model.height if model else bounds.default_height) if request.height is None else request.height
    if width * height > bounds.max_pixels:
        raise ValidationFailed(
            f"width x height = {width * height} pixels is over the budget of {bounds.max_pixels}", field="width"
        )
    if request.webhook_events is not None and request.webhook is None:
        raise ValidationFailed("'webhook_events' needs a 'webhook'", field="webhook_events")


def _combination_schema(bounds: RequestBounds) -> dict[str, Any]:
    """``_check_combination``'s rules as JSON Schema ``if``/``then`` clauses.

    The pixel budget is one clause per run of widths that share a tallest height (widths
    whose full height range fits the budget need none): with the default bounds (512 a
    side, 512 x 512 pixels) there are none at all. An omitted or null side is its default.
    Many clauses stay valid JSON Schema but outgrow what schemathesis can generate from
    (1024 a side in the same budget needs 93; it gave up between 20 and 50)."""
    rules: list[dict[str, Any]] = [
        {
            "if": {"required": ["webhook_events"], "properties": {"webhook_events": {"type": "array"}}},
            "then": {"required": ["webhook"], "properties": {"webhook": {"type": "string"}}},
        }
    ]
    runs: dict[int, list[int]] = {}
    for width in range(8, bounds.largest_side + 1, 8):
        if (tallest := bounds.tallest(width)) < bounds.largest_side:
            runs.setdefault(tallest, []).append(width)
    for tallest, widths in runs.items():
        height: dict[str, Any] = {"maximum": tallest}
        then: dict[str, Any] = {"properties": {"height": height}}
        if bounds.default_height > tallest:  # an omitted height would be over the budget
            height["type"] = "integer"
            then["required"] = ["height"]
        width_is = {"type": "integer", "minimum": widths[0], "maximum": widths[-1]}
        rules.append({"if": {"required": ["width"], "properties": {"width": width_is}}, "then": then})
    if (tallest := bounds.tallest(bounds.default_width)) < bounds.largest_side:
        width_given = {"required": ["width"], "properties": {"width": {"type": "integer"}}}
        rules.append({"if": {"not": width_given}, "then": {"properties": {"height": {"maximum": tallest}}}})
    rules += model_rules(bounds)
    return {"allOf": rules}


def model_rules(bounds: RequestBounds) -> list[dict[str, Any]]:
    """A model's own step range and schedulers, where they are narrower than the fields'."""
    rules: list[dict[str, Any]] = []
    for model in bounds.models:
        if model.name == bounds.default_model:  # absent, null or named
            chosen: dict[str, Any] = {"properties": {"model": {"enum": [model.name, None]}}}
        else:
            chosen = {"required": ["model"], "properties": {"model": {"const": model.name}}}
        then: dict[str, Any] = {}
        if (model.min_steps, model.max_steps) != (1, bounds.max_steps):
            then["steps"] = {"minimum": model.min_steps, "maximum": model.max_steps}
        if model.schedulers is not None:
            then["scheduler"] = {"enum": [*model.schedulers, None]}
        every = {a for m in bounds.models for a in m.adapters}
        if not model.adapters and every:
            then["loras"] = {"maxItems": 0}
        elif set(model.adapters) != every:
            then["loras"] = {"items": {"properties": {"name": {"enum": list(model.adapters)}}}}
        if then:
            rules.append({"if": chosen, "then": {"properties": then}})
    return rules
