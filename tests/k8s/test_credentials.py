"""Storage credentials in a cluster: empty ones leave boto3 its own chain (IRSA, EKS Pod
Identity, an instance role), as k8s/secrets.example.env says."""

from __future__ import annotations

from tasks.settings import Settings
from tasks.storage import make_s3_client


def test_empty_credentials_use_the_default_chain(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-chain")
    client = make_s3_client(Settings(s3_access_key_id="", s3_secret_access_key="", s3_endpoint_url=""))
    assert client._request_signer._credentials.access_key == "from-the-chain"


def test_given_credentials_are_used(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-chain")
    client = make_s3_client(Settings(s3_access_key_id="fleet", s3_secret_access_key="fleet-secret"))
    assert client._request_signer._credentials.access_key == "fleet"
