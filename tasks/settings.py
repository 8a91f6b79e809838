"""Every setting of the fleet, read from ``FLEET_*`` environment variables in one place.

Defaults make the local fleet work with no configuration: Redis and the S3 server
listen where ``fleet up`` starts its embedded copies, and the model is the tiny one
``fleet model init`` writes. Setting ``FLEET_REDIS_URL`` or ``FLEET_S3_ENDPOINT_URL``
points the fleet at an external server instead (and ``fleet up`` then starts none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.keys import DEV_KEY, DEV_KEYS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6390/0"
DEFAULT_S3_ENDPOINT_URL = "http://127.0.0.1:9010"
WEEK_S = 7 * 24 * 3600

#: ``torch.compile`` of the UNet: off, or one of its modes.
CompileMode = Literal["off", "reduce-overhead", "max-autotune", "default"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
#: The queues a job may name: each its own batching policy.
ServiceClass = Literal["interactive", "batch"]
#: How a worker stores its model's weights: as loaded, or int8 (``workers.quantize``).
Quantization = Literal["none", "int8"]
LogFormat = Literal["text", "json"]
#: When a batch's images share the model: "request": a batch is one model call from its
#: first step to its last; "step": batches join the running ones at step boundaries and
#: leave when their own steps are done (workers.stepping).
BatchingMode = Literal["request", "step"]
#: A queue's batching: one of the modes, or "auto": the mode its model runs best, which
#: the engine reports (``Model.batching``): "step" on a GPU running eagerly, where a step
#: of a few images costs about what one image's does (docs/BENCHMARKS.md §13).
BatchingSetting = Literal["auto", "request", "step"]


@dataclass(frozen=True)
class WarmShape:
    """A size the engine runs once per batch size before the worker consumes: no served
    shape pays for lazy initialisation (or compilation) in a client's request."""

    width: int
    height: int
    batch_sizes: tuple[int, ...]

    @classmethod
    def parse_list(cls, text: str) -> tuple[WarmShape, ...]:
        """``512x512:1,8 768x512:1`` (shapes separated by spaces or ``;``)."""
        shapes = []
        for part in filter(None, re.split(r"[;\s]+", text.strip())):
            match = re.fullmatch(r"(\d+)x(\d+):(\d+(?:,\d+)*)", part)
            if not match:
                raise ValueError(f"warm shape '{part}': expected WIDTHxHEIGHT:BATCH[,BATCH...], e.g. 512x512:1,8")
            width, height = int(match[1]), int(match[2])
            sizes = tuple(sorted({int(n) for n in match[3].split(",")}))
            if width % 8 or height % 8 or 0 in sizes:
                raise ValueError(f"warm shape '{part}': sides must be multiples of 8 and batch sizes positive")
            shapes.append(cls(width, height, sizes))
        return tuple(shapes)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}:{','.join(map(str, self.batch_sizes))}"


class QueuePolicy(BaseModel):
    """Batching settings of one queue; unset fields take the worker-wide ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_images: int | None = Field(None, gt=0)
    max_wait_ms: float | None = Field(None, ge=0)
    batch_policy: Literal["fixed", "adaptive"] | None = None
    batching: BatchingSetting | None = None


@dataclass(frozen=True)
class Batching:
    """One queue's batching, every field filled in (``Settings.policy_for``)."""

    max_batch_images: int
    max_wait_ms: float
    batch_policy: Literal["fixed", "adaptive"]
    batching: BatchingSetting = "auto"


#: How many times more jobs a worker that swaps models holds (``Settings.task_threads``).
SWAP_HOLD = 4


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", frozen=True)

    # -- where things live -------------------------------------------------------------
    state_dir: Path = Path(".fleet")
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = ""  # empty: the same Redis as the job store
    s3_endpoint_url: str = DEFAULT_S3_ENDPOINT_URL  # empty: AWS S3 itself
    s3_bucket: str = "fleet-images"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = "fleet"
    s3_secret_access_key: str = "fleet-secret"
    url_expiry_s: int = Field(3600, ge=60, le=WEEK_S)

    # -- the model -----------------------------------------------------------------------
    model: str = ""  # a diffusers model dir or hub id; empty: <state_dir>/models/tiny
    # Many models on one fleet (tasks/registry.py, docs/models.example.toml): a TOML file of
    # named models; empty: FLEET_MODEL alone, named after its directory.
    models_file: str = ""
    default_model: str = ""  # the model a request without "model" gets; empty: the file's default
    serve: str = ""  # the models this worker serves, comma-separated; empty: the default model
    # The bytes of weights a worker serving several models keeps loaded (the least recently
    # used are evicted); 0: no budget, every model it serves stays loaded once used.
    model_memory_mb: int = Field(0, ge=0)
    # A job for a model no live worker serves: "queue" it (it waits, its place in line
    # shown, until a worker of that model starts: a pool scaled to zero) or "reject" it
    # (503 with Retry-After, naming "model"; nothing queued).
    unserved_model: Literal["queue", "reject"] = "queue"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    dtype: DType = "auto"
    # "int8": the UNet's convolution and linear weights stored as int8, widened per call
    # (a quarter of the memory; docs/QUALITY.md measures what it costs).
    quantize: Quantization = "none"
    # The engine: "process" (spawned, runs nothing but the model) or "thread" (the model on
    # a thread of the worker process: the earlier design, kept to measure against).
    engine: Literal["process", "thread"] = "process"
    # Shapes and batch sizes run before the worker consumes: "512x512:1,8 768x768:1".
    # Empty: the default size at max_batch_images.
    warm_shapes: str = ""
    compile: CompileMode = "off"
    compile_cache_dir: str = ""  # empty: <state_dir>/compile-cache
    # Set by `fleet worker` (one worker per GPU on a host): the worker's name, metrics port
    # (worker_metrics_port + slot) and GPU (the slot-th visible one) follow from it.
    worker_slot: int | None = Field(None, ge=0)

    # -- request bounds and defaults -----------------------------------------------------
    default_width: int = 64
    default_height: int = 64
    default_steps: int = Field(20, gt=0)
    default_guidance_scale: float = Field(7.5, ge=0, le=50)
    max_pixels: int = Field(512 * 512, ge=64)
    # The square root of the budget: the side bounds then imply it, and the request schema
    # needs no cross-field rule. A larger side (wide images within the same budget) works
    # too; the schema then spells the budget out per range of widths.
    max_side: int = Field(512, ge=8)
    max_steps: int = Field(100, gt=0)
    max_images_per_job: int = Field(8, gt=0)
    max_prompt_chars: int = Field(2000, gt=0)
    max_body_bytes: int = Field(64 * 1024, gt=0)

    # -- API keys and limits (tasks/keys.py) ---------------------------------------------
    # NAME:SHA256 entries; the default is the development key "fleet-dev-key" (name "dev").
    api_keys: str = DEV_KEYS
    api_key_file: str = ""  # one NAME:SHA256 per line, added to api_keys
    api_key: str = DEV_KEY  # the key `fleet submit` and `fleet bench load` send
    rate_limit_per_minute: int = Field(600, ge=0)  # job submissions per key per minute; 0: none
    max_active_jobs_per_key: int = Field(1000, ge=0)  # queued or running per key; 0: no cap
    idempotency_ttl_s: int = Field(24 * 3600, gt=0)  # how long an Idempotency-Key is remembered
    # How long POST /v1/images/generations holds a request for its job (docs/OPENAI.md); a
    # job no worker started by then is canceled (its Cancel-After), a running one goes on.
    openai_timeout_s: float = Field(300.0, gt=0)

    # -- reliability (docs/RELIABILITY.md says why each default) -------------------------
    job_ttl_s: int = Field(WEEK_S, gt=0)
    visibility_timeout_s: int = Field(900, gt=0)
    consumer_timeout_s: int = Field(1800, gt=0)
    # How soon a dead broker link is noticed: the AMQP heartbeat on RabbitMQ (either side
    # drops the connection after about two silent intervals); on Redis the interval of the
    # transport's health checks, and half the socket timeout of its blocking reads.
    broker_heartbeat_s: int = Field(10, gt=0)
    max_attempts: int = Field(3, gt=0)
    retry_window_s: float = Field(60.0, ge=0)
    retry_backoff_s: float = Field(0.5, gt=0)
    outbox_grace_s: float = Field(30.0, gt=0)
    republish_after_s: float = Field(900.0, gt=0)
    sweep_interval_s: float = Field(5.0, gt=0)

    # -- queues, workers and batching -----------------------------------------------------
    # Service classes: each its own queue, each queue its own batching policy
    # (``queue_policies``). A job names its class; workers consume one queue or both.
    queue: str = "fleet.interactive"  # the interactive class (and the default queue)
    batch_queue: str = "fleet.batch"  # the batch class: large batches, latency second
    default_service_class: ServiceClass = "interactive"
    publish_timeout_s: float = Field(3.0, gt=0)
    max_batch_images: int = Field(8, gt=0)
    max_wait_ms: float = Field(100.0, ge=0)
    batch_policy: Literal["fixed", "adaptive"] = "adaptive"
    # "request": a batch runs as one model call; "step": jobs join the running batch at its
    # next step boundary and leave when their own steps are done; "auto": step-level for a
    # model running eagerly on a GPU, request-level elsewhere (docs/BENCHMARKS.md §13).
    batching: BatchingSetting = "auto"
    # Per-queue overrides of the four above, as JSON:
    # {"fleet.interactive": {"max_batch_images": 2, "max_wait_ms": 0, "batch_policy": "fixed", "batching": "step"}}
    # The interactive queue takes the worker-wide settings above; the batch queue waits
    # longer to fill its batches.
    queue_policies: dict[str, QueuePolicy] = {"fleet.batch": QueuePolicy(max_wait_ms=1000, batch_policy="fixed")}
    worker_threads: int = Field(0, ge=0)  # 0: twice the largest max_batch_images
    worker_metrics_port: int = Field(9808, ge=0)  # 0: no Prometheus endpoint
    png_compress_level: int = Field(1, ge=0, le=9)
    upload_threads: int = Field(8, gt=0)

    # -- webhooks (docs/WEBHOOKS.md) ------------------------------------------------------
    # The master key every owner's signing secret is derived from: change it anywhere but
    # your laptop (changing it changes every owner's secret).
    webhook_signing_key: str = Field("dev-webhook-signing-key-change-me", min_length=1)
    # Deliver to loopback, private, link-local and metadata addresses: local receivers only.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_backoff_s: float = Field(5.0, gt=0)  # first wait between attempts; doubles up to an hour
    webhook_retry_window_s: float = Field(86400.0, ge=0)  # no attempt starts later than this after the first
    webhook_queue: str = "fleet.webhooks"
    webhook_threads: int = Field(16, gt=0)  # deliveries `fleet hooks` makes at once

    # -- local fleet and monitoring ------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: str = "admin:fleet"  # user:password; never empty outside local use
    # Which servers `fleet up` starts itself: "auto" starts Redis unless FLEET_REDIS_URL is
    # set and the S3 server unless FLEET_S3_ENDPOINT_URL is set; or a list like "redis,s3".
    embedded: str = "auto"
    # "text" for people at a terminal; "json" for log collectors: one object per line, with
    # the job id and batch id of the event (docs/OBSERVABILITY.md).
    log_format: LogFormat = "text"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_width % 8 or self.default_height % 8:
            raise ValueError("FLEET_DEFAULT_WIDTH/HEIGHT must be multiples of 8")
        # A request that gives only a prompt gets the defaults: they must be a valid request.
        sides_fit = all(8 <= side <= self.max_side for side in (self.default_width, self.default_height))
        if not sides_fit or self.default_width * self.default_height > self.max_pixels:
            raise ValueError("FLEET_DEFAULT_WIDTH x FLEET_DEFAULT_HEIGHT must fit FLEET_MAX_SIDE and FLEET_MAX_PIXELS")
        if self.default_steps > self.max_steps:
            raise ValueError("FLEET_DEFAULT_STEPS must be at most FLEET_MAX_STEPS")
        if ":" not in self.flower_basic_auth:
            raise ValueError("FLEET_FLOWER_BASIC_AUTH must be user:password")
        WarmShape.parse_list(self.warm_shapes)  # a clear error now rather than in the engine
        if not self.effective_broker_url.startswith(("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")):
            raise ValueError("FLEET_BROKER_URL must be redis://... or amqp://...")
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def broker_is_amqp(self) -> bool:
        return self.effective_broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))

    def policy_for(self, queue: str) -> Batching:
        """The batching settings of ``queue``, every field filled in."""
        override = self.queue_policies.get(queue, QueuePolicy())
        return Batching(
            max_batch_images=override.max_batch_images or self.max_batch_images,
            max_wait_ms=self.max_wait_ms if override.max_wait_ms is None else override.max_wait_ms,
            batch_policy=override.batch_policy or self.batch_policy,
            batching=override.batching or self.batching,
        )

    @property
    def task_threads(self) -> int:
        """Task threads per worker: enough to gather the next batch while one runs, for
        each model it serves (a batch takes one model's jobs); a worker that swaps models
        (a memory budget) holds ``SWAP_HOLD`` times more, so that the model it loads next
        has jobs enough waiting to pay for the swap."""
        if self.worker_threads:
            return self.worker_threads
        largest = max([self.max_batch_images] + [p.max_batch_images or 0 for p in self.queue_policies.values()])
        models = max(1, len([name for name in self.serve.split(",") if name.strip()]))
        return 2 * largest * models * (SWAP_HOLD if models > 1 and self.model_memory_mb > 0 else 1)

    @property
    def warm(self) -> tuple[WarmShape, ...]:
        return self.warm_shapes_for(self.default_width, self.default_height)

    def warm_shapes_for(self, width: int, height: int) -> tuple[WarmShape, ...]:
        """The configured shapes, else ``width`` x ``height`` at every batch size up to
        ``max_batch_images`` (eager: on an H200 a batch size never run before cost its first
        call 1 s more, and warming them all takes seconds), or at 1 and the largest when
        compiled (each compiles for a minute; the sizes between are padded up)."""
        configured = WarmShape.parse_list(self.warm_shapes)
        if configured:
            return configured
        largest = self.max_batch_images
        sizes = tuple(sorted({1, largest})) if self.compile != "off" else tuple(range(1, largest + 1))
        return (WarmShape(width, height, sizes),)

    @property
    def metrics_port(self) -> int:
        """This worker's Prometheus port: one port per slot on a shared host."""
        if not self.worker_metrics_port:
            return 0
        return self.worker_metrics_port + (self.worker_slot or 0)

    @property
    def compile_cache(self) -> Path:
        return Path(self.compile_cache_dir) if self.compile_cache_dir else self.state_dir / "compile-cache"

    @property
    def model_ref(self) -> str:
        return self.model or str(self.tiny_model_dir)

    @property
    def tiny_model_dir(self) -> Path:
        return self.state_dir / "models" / "tiny"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, validated once at first use."""
    return Settings()


class ClientSettings(BaseSettings):
    """What a client of the API reads (``fleet submit``, ``FleetClient.from_env``). Apart
    from ``Settings`` so that a user's machine needs none of the fleet's own settings, and
    a fleet setting that is wrong there never stops a client."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", frozen=True)

    api_url: str = ""  # empty: http://FLEET_API_HOST:FLEET_API_PORT, the local fleet
    api_key: str = Settings.model_fields["api_key"].default  # sent as Authorization: Bearer
    api_host: str = Settings.model_fields["api_host"].default
    api_port: int = Settings.model_fields["api_port"].default

    @property
    def base_url(self) -> str:
        return (self.api_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")
