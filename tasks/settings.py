"""Every setting of the fleet, read from ``FLEET_*`` environment variables in one place.

Defaults make the local fleet work with no configuration: Redis and the S3 server
listen where ``fleet up`` starts its embedded copies, and the model is the tiny one
``fleet model init`` writes. Setting ``FLEET_REDIS_URL`` or ``FLEET_S3_ENDPOINT_URL``
points the fleet at an external server instead (and ``fleet up`` then starts none).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6390/0"
DEFAULT_S3_ENDPOINT_URL = "http://127.0.0.1:9010"
WEEK_S = 7 * 24 * 3600


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
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    # -- request bounds and defaults -----------------------------------------------------
    default_width: int = 64
    default_height: int = 64
    default_steps: int = 20
    default_guidance_scale: float = 7.5
    max_pixels: int = Field(512 * 512, gt=0)
    max_side: int = Field(1024, gt=0)
    max_steps: int = Field(100, gt=0)
    max_images_per_job: int = Field(8, gt=0)
    max_prompt_chars: int = Field(2000, gt=0)
    max_body_bytes: int = Field(64 * 1024, gt=0)

    # -- job records ---------------------------------------------------------------------
    job_ttl_s: int = Field(WEEK_S, gt=0)

    # -- queues and workers --------------------------------------------------------------
    queue: str = "fleet.default"
    worker_threads: int = Field(2, gt=0)
    publish_timeout_s: float = Field(3.0, gt=0)

    # -- local fleet and monitoring ------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: str = "admin:fleet"  # user:password; never empty outside local use
    # Which servers `fleet up` starts itself: "auto" starts Redis unless FLEET_REDIS_URL is
    # set and the S3 server unless FLEET_S3_ENDPOINT_URL is set; or a list like "redis,s3".
    embedded: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.default_width % 8 or self.default_height % 8:
            raise ValueError("FLEET_DEFAULT_WIDTH/HEIGHT must be multiples of 8")
        if ":" not in self.flower_basic_auth:
            raise ValueError("FLEET_FLOWER_BASIC_AUTH must be user:password")
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

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
