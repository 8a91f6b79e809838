"""The bucket is private, keys follow jobs/<id>/<i>.png and presigned URLs carry a bounded expiry."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
import requests
from pydantic import ValidationError

from tasks.jobs import new_job_id
from tasks.settings import WEEK_S, Settings
from tasks.storage import image_key


def test_image_keys_are_per_job_and_index():
    assert image_key("abc", 2) == "jobs/abc/2.png"


def test_a_presigned_url_downloads_the_object_and_states_its_expiry(storage, settings):
    key = image_key(new_job_id(), 0)
    storage.put_image(key, b"\x89PNG fake", "image/png")
    signed = storage.presign(key)
    assert signed.expires_in_s == settings.url_expiry_s
    assert parse_qs(urlparse(signed.url).query)["X-Amz-Expires"] == [str(settings.url_expiry_s)]
    assert requests.get(signed.url, timeout=10).content == b"\x89PNG fake"


def test_the_bucket_is_private(storage, settings):
    key = image_key(new_job_id(), 0)
    storage.put_image(key, b"secret", "image/png")
    unsigned = f"{settings.s3_endpoint_url}/{settings.s3_bucket}/{key}"
    assert requests.get(unsigned, timeout=10).status_code == 403


@pytest.mark.parametrize("expiry", [0, 59, WEEK_S + 1])
def test_url_expiry_is_bounded(expiry):
    with pytest.raises(ValidationError):
        Settings(url_expiry_s=expiry)
