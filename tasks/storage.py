"""Object storage for generated images: a private S3-compatible bucket.

Images live at ``jobs/<job id>/<index>.<png|webp|jpg>``, stored with their content type;
job ids are 128 random bits, so keys are not guessable. Clients never read the bucket
directly: ``GET /v1/jobs/<id>`` signs a download URL per image at read time, with an
expiry bounded by ``FLEET_URL_EXPIRY_S``.
Whether an expired or tampered URL is refused is up to the store (S3, MinIO and R2
enforce it; moto's server, used locally, does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tasks.errors import DependencyUnavailable
from tasks.settings import Settings

if TYPE_CHECKING:  # the stubs' client type (boto3-stubs[s3], a dev tool): nothing at run time
    from mypy_boto3_s3 import S3Client

#: File name extension of each output format.
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def image_key(job_id: str, index: int, output_format: str = "png") -> str:
    return f"jobs/{job_id}/{index}.{EXTENSIONS[output_format]}"


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_in_s: int


class ObjectStorage:
    def __init__(self, client: S3Client, bucket: str, url_expiry_s: int):
        self._s3 = client
        self.bucket = bucket
        self.url_expiry_s = url_expiry_s

    def ping(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if missing, private (no public ACL, public access blocked)."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._s3.create_bucket(Bucket=self.bucket, ACL="private")
        self._s3.put_public_access_block(
            Bucket=self.bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )

    def put_image(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    def delete(self, keys: list[str]) -> None:
        """Remove objects (the images of a job canceled while they were uploading)."""
        if not keys:
            return
        try:
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    def list_keys(self, prefix: str) -> list[str]:
        listed = self._s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for obj in listed.get("Contents", []))

    def get(self, key: str) -> bytes:
        try:
            body: bytes = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return body
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    def presign(self, key: str) -> SignedUrl:
        url = self._s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_expiry_s
        )
        return SignedUrl(url=url, expires_in_s=self.url_expiry_s)


def make_s3_client(settings: Settings) -> S3Client:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        # Empty: boto3's own chain (environment, IRSA or EKS Pod Identity, instance role)
        # instead of empty strings that sign nothing.
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=settings.s3_secret_access_key or None,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=3,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


def make_storage(settings: Settings) -> ObjectStorage:
    return ObjectStorage(make_s3_client(settings), settings.s3_bucket, settings.url_expiry_s)
