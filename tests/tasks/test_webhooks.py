"""Webhooks: Standard Webhooks signatures, the SSRF rules, pinned connections, and delivery
through a real ``fleet hooks`` worker on real Redis to a real HTTP receiver."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleet.processes import free_port, wait_for
from fleet.stack import settings_from_env
from tasks import webhooks
from tasks.celery import make_celery
from tasks.destinations import resolve_destination
from tasks.errors import ForbiddenDestination, ValidationFailed
from tasks.registry import load_registry
from tasks.settings import Settings
from tasks.webhooks import (
    MAX_BACKOFF_S,
    WebhookDelivery,
    attempt,
    backoff_s,
    check_webhook_url,
    deliver,
    send_webhook,
    sign,
    verify,
    webhook_secret,
)
from tests.stack import RabbitMQ, rabbitmq_available, start_hooks

SIGNING_KEY = "test-signing-key"
OWNER = "dev"


# -- signatures and secrets ----------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_test_vector():
    """The vector of the reference library's test_sign_function (standard-webhooks/standard-webhooks,
    libraries/python/tests/test_webhooks.py), signed and verified."""
    secret, msg_id, timestamp = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    body = b'{"test": 2432232314}'
    signature = sign(secret, msg_id, timestamp, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"Webhook-Id": msg_id, "Webhook-Timestamp": str(timestamp), "Webhook-Signature": signature}
    assert verify(secret, headers, body, now=timestamp + 10)


def test_verify_refuses_a_tampered_body_a_wrong_secret_and_an_old_timestamp():
    """Each of the three fails alone; one valid signature among several passes (rotation)."""
    secret, other = webhook_secret(Settings(webhook_signing_key="a"), OWNER), webhook_secret(Settings(), OWNER)
    now = int(time.time())
    body = b'{"type":"start"}'
    headers = {"webhook-id": "d1", "webhook-timestamp": str(now), "webhook-signature": sign(secret, "d1", now, body)}
    assert verify(secret, headers, body)
    assert not verify(secret, headers, b'{"type":"completed"}')
    assert not verify(other, headers, body)
    old = {**headers, "webhook-timestamp": str(now - 301), "webhook-signature": sign(secret, "d1", now - 301, body)}
    assert not verify(secret, old, body)
    rotated = {**headers, "webhook-signature": f"v1,AAAA {headers['webhook-signature']} v2,BBBB"}
    assert verify(secret, rotated, body)
    assert not verify(secret, {**headers, "webhook-timestamp": "soon"}, body)


def test_each_owner_has_a_stable_secret_derived_from_the_signing_key():
    """whsec_ + base64 of 32 bytes; the same for every process, different per owner and per key."""
    settings = Settings(webhook_signing_key=SIGNING_KEY)
    secret = webhook_secret(settings, OWNER)
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 44
    assert secret == webhook_secret(Settings(webhook_signing_key=SIGNING_KEY), OWNER)
    assert secret != webhook_secret(settings, "someone-else")
    assert secret != webhook_secret(Settings(webhook_signing_key="another-key"), OWNER)


# -- where a webhook may go ------------------------------------------------------------------

FORBIDDEN_URLS = [
    "http://127.0.0.1/hook",
    "http://localhost:8080/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fd00:ec2::254]/latest/meta-data/",
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_loopback_private_link_local_and_metadata_addresses_are_refused_unless_allowed(url):
    """Checked on the resolved addresses (localhost included), allowed only by the setting."""
    with pytest.raises(ForbiddenDestination) as refused:
        resolve_destination(url, allow_private=False)
    assert (refused.value.field, refused.value.code) == ("webhook", "forbidden_destination")
    assert resolve_destination(url, allow_private=True).address


def test_a_name_is_refused_if_any_of_its_addresses_is_private(monkeypatch):
    """Every address a name resolves to is checked, not only the first."""
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ("93.184.215.14", "10.0.0.5")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answers)
    with pytest.raises(ForbiddenDestination, match=r"hooks\.example \(10\.0\.0\.5\), a private address"):
        resolve_destination("https://hooks.example/in", allow_private=False)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "file:///etc/passwd", "gopher://example.com/", "example.com"]
)
def test_only_http_and_https_urls_are_sent_to(url):
    for allow_private in (False, True):
        with pytest.raises(ValidationFailed, match="http:// or https://"):
            resolve_destination(url, allow_private)


def test_the_submit_time_check_is_syntax_and_literal_addresses_only():
    """Names pass without a DNS lookup; bad URLs and forbidden literal IPs fail naming the field."""
    strict, relaxed = Settings(), Settings(webhook_allow_private=True)
    check_webhook_url("https://hooks.example.invalid/fleet?token=1", strict)  # never resolved here
    check_webhook_url("http://127.0.0.1:9000/hook", relaxed)
    refused = {
        "http://127.0.0.1:9000/hook": "loopback",
        "http://[fd00:ec2::254]/": "private",
        "ftp://example.com/": "http:// or https://",
        "https:///path": "no host",
        "https://user:pass@example.com/": "credentials",
        "https://example.com:99999/": "port",
        "https://example.com/" + "a" * 2048: "longer than 2048",
        "https://example.com/a b": "ASCII without spaces",
        f"https://{'a' * 64}.example.com/": "invalid host name",
    }
    for url, reason in refused.items():
        with pytest.raises(ValidationFailed, match=reason) as error:
            check_webhook_url(url, strict)
        assert error.value.field == "webhook"


# -- one attempt, in this process ----------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    valid: bool
    status: int

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")


class Receiver:
    """A webhook receiver on loopback that verifies every signature and answers by path:
    ``/ok`` 204, ``/flaky`` 500 to a delivery's first attempt then 204, ``/redirect`` 302 to
    ``/elsewhere``, ``/gone`` 410; an invalid signature gets 401."""

    def __init__(self, secret: str, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
        self.secret = secret
        self.host = host
        self.requests: list[Received] = []
        self.server_names: list[str | None] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, 0), self._handler())
        if tls is not None:
            tls.sni_callback = lambda sock, name, context: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def hits(self, path: str | None = None, delivery_id: str | None = None) -> list[Received]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (path is None or r.path == path) and (delivery_id is None or r.id == delivery_id)
            ]

    def accepted(self, delivery_id: str) -> list[Received]:
        return [r for r in self.hits(delivery_id=delivery_id) if 200 <= r.status < 300]

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        valid = verify(self.secret, headers, body)
        with self.lock:
            seen = any(r.id == headers.get("webhook-id") for r in self.requests)
            if not valid:
                status = 401
            else:
                status = {"/ok": 204, "/flaky": 204 if seen else 500, "/redirect": 302, "/gone": 410}.get(path, 404)
            self.requests.append(Received(path, headers, body, valid, status))
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {name.lower(): value for name, value in self.headers.items()}
                status = receiver._answer(self.path, headers, body)
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", receiver.url("/elsewhere"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # a client that followed a 302 might come back with a GET

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver(webhook_secret(Settings(webhook_signing_key=SIGNING_KEY), OWNER))
    yield receiver
    receiver.close()


def local_settings(**overrides) -> Settings:
    return Settings(webhook_signing_key=SIGNING_KEY, webhook_allow_private=True, webhook_timeout_s=5, **overrides)


def a_delivery(url: str, event: str = "completed", **data) -> WebhookDelivery:
    return WebhookDelivery(id=f"msg_{uuid.uuid4().hex}", url=url, owner=OWNER, event=event, data=data, created_at=1.5)


def fake_dns(monkeypatch, names: dict[str, list[str]]) -> list[str]:
    """Resolve ``names`` to the given addresses, one answer per lookup (the last repeats);
    everything else as usual. Returns the names looked up, in order."""
    real, looked_up = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            return real(host, port, *args, **kwargs)
        looked_up.append(host)
        address = names[host][min(looked_up.count(host), len(names[host])) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_an_attempt_connects_to_the_address_it_checked_and_never_resolves_again(receiver, monkeypatch):
    """DNS rebinding: a second lookup would answer a private address; there is none."""
    looked_up = fake_dns(monkeypatch, {"rebind.example": ["127.0.0.1", "10.255.255.1"]})
    delivery = a_delivery(receiver.url("/ok", host="rebind.example"), job="j1")
    assert deliver(delivery, local_settings()) == 204
    assert looked_up == ["rebind.example"]
    (request,) = receiver.hits(delivery_id=delivery.id)
    assert request.valid and request.headers["host"] == f"rebind.example:{receiver.port}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "diffusion-fleet-webhooks/1"
    assert json.loads(request.body) == {
        "type": "completed",
        "timestamp": "1970-01-01T00:00:01.500Z",
        "data": {"job": "j1"},
    }


def test_every_attempt_is_signed_afresh_with_the_same_id_and_body(receiver, monkeypatch):
    """A retry carries the delivery's id and bytes with a new timestamp and signature."""
    delivery = a_delivery(receiver.url("/ok"))
    clock = [time.time() - 60]
    monkeypatch.setattr(webhooks, "time", types.SimpleNamespace(time=lambda: clock[0]))
    deliver(delivery, local_settings())
    clock[0] += 59
    deliver(delivery, local_settings())
    first, second = receiver.hits(delivery_id=delivery.id)
    assert first.valid and second.valid and first.body == second.body
    assert int(second.headers["webhook-timestamp"]) == int(first.headers["webhook-timestamp"]) + 59
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]


def make_certificate(tmp_path, name: str):
    """A self-signed certificate for ``name``, trusted as its own authority."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_https_goes_to_the_pinned_address_with_sni_and_a_certificate_for_the_name(tmp_path, monkeypatch):
    """The TLS handshake names the URL's host and the certificate must carry it, though the
    connection goes to the checked address."""
    cert_file, key_file = make_certificate(tmp_path, "hooks.example")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    secure = Receiver(webhook_secret(local_settings(), OWNER), tls=tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # the client's default trust store
    fake_dns(monkeypatch, {"hooks.example": ["127.0.0.1"], "impostor.example": ["127.0.0.1"]})
    try:
        assert deliver(a_delivery(f"https://hooks.example:{secure.port}/ok"), local_settings()) == 204
        assert "hooks.example" in secure.server_names
        with pytest.raises(ssl.SSLCertVerificationError):
            deliver(a_delivery(f"https://impostor.example:{secure.port}/ok"), local_settings())
        assert [r.headers["host"] for r in secure.hits()] == [f"hooks.example:{secure.port}"]
    finally:
        secure.close()


def test_410_gone_ends_a_delivery_and_a_failure_schedules_the_next_attempt(receiver):
    """410 is final; a 500 or a refused connection sets the next attempt within the window."""
    settings = local_settings(webhook_backoff_s=10)
    assert attempt(a_delivery(receiver.url("/gone")), settings) is None
    assert len(receiver.hits("/gone")) == 1
    for url in (receiver.url("/flaky"), f"http://127.0.0.1:{free_port()}/nobody-listens"):
        before = time.time()
        retry = attempt(a_delivery(url), settings, rng=lambda: 0.0)
        assert retry is not None and retry.attempts == 1 and retry.first_attempt_at >= before
        assert 10 <= retry.due_at - before <= 10 + 5


def test_a_delivery_out_of_its_window_is_given_up(receiver, caplog):
    settings = local_settings(webhook_retry_window_s=60)
    delivery = a_delivery(receiver.url("/flaky"))
    late = replace(delivery, attempts=7, first_attempt_at=time.time() - 59)
    with caplog.at_level(logging.WARNING, logger="tasks.webhooks"):
        assert attempt(late, settings) is None
    assert "gave up after 8 attempts" in caplog.text


def test_backoff_doubles_from_the_base_up_to_an_hour_less_up_to_half_at_random():
    assert [backoff_s(n, 5, rng=lambda: 0.0) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_s(1, 5, rng=lambda: 0.999) == pytest.approx(2.5, abs=0.01)
    assert backoff_s(40, 5, rng=lambda: 0.0) == MAX_BACKOFF_S


def test_a_broker_that_is_down_loses_the_webhook_not_the_caller(caplog):
    """send_webhook returns at once and logs; it never raises into a job."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", publish_timeout_s=0.5)
    app = make_celery(settings)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tasks.webhooks"):
        send_webhook(app, settings, url="https://example.com/", owner=OWNER, event="start", data={}, delivery_id="d1")
    assert time.monotonic() - started < 5
    assert "webhook d1 (start) to https://example.com/ lost" in caplog.text
    with pytest.raises(ValueError, match="start, progress, completed"):
        send_webhook(app, settings, url="https://example.com/", owner=OWNER, event="done", data={}, delivery_id="d2")
    with pytest.raises(ValueError, match="delivery id"):
        send_webhook(app, settings, url="https://example.com/", owner=OWNER, event="start", data={}, delivery_id="a\nb")


def test_task_events_show_a_deliverys_ids_never_its_data():
    """Flower shows a task's argsrepr: a webhook's data holds the prompt and image URLs."""
    sent = {}

    class Recorder:
        def send_task(self, name, **options):
            sent.update(options)

    data = {"request": {"prompt": "a secret prompt"}, "images": [{"url": "https://s3/signed"}]}
    send_webhook(Recorder(), Settings(), url="https://example.com/", owner=OWNER, event="start", data=data,
                 delivery_id="d1")  # fmt: skip
    assert sent["args"][0]["data"] == data
    assert sent["argsrepr"] == "[{'id': 'd1', 'event': 'start', 'attempts': 0}]"


def test_job_workers_leave_the_webhook_queue_to_fleet_hooks_which_imports_no_model():
    """The shared app declares the webhook queue without consuming it; the hooks worker
    consumes it alone and loads neither torch nor the GPU worker."""
    settings = Settings()
    app = make_celery(settings)
    assert settings.webhook_queue in app.amqp.queues
    assert set(app.amqp.queues.consume_from) == set(load_registry(settings).job_queues)
    probe = (
        "import sys, tasks.webhook_worker as w; print(sorted(w.app.amqp.queues.consume_from)); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'workers', 'flask'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str([settings.webhook_queue]), "[]"]


# -- through a real `fleet hooks` worker ---------------------------------------------------


def hooks_env(redis_url: str, work_dir, queue: str, allow_private: bool) -> dict[str, str]:
    return {
        "FLEET_REDIS_URL": redis_url,
        "FLEET_STATE_DIR": str(work_dir / "state"),
        "FLEET_WEBHOOK_SIGNING_KEY": SIGNING_KEY,
        "FLEET_WEBHOOK_QUEUE": queue,
        "FLEET_WEBHOOK_ALLOW_PRIVATE": "true" if allow_private else "false",
        "FLEET_WEBHOOK_BACKOFF_S": "0.2",
        "FLEET_WEBHOOK_RETRY_WINDOW_S": "5",
        "FLEET_WEBHOOK_TIMEOUT_S": "5",
    }


class Hooks:
    """A running ``fleet hooks`` and a publisher to its queue."""

    def __init__(self, env: dict[str, str], work_dir, name: str):
        self.settings = settings_from_env(env)
        self.app = make_celery(self.settings)
        self.server = start_hooks(env, work_dir, name)

    def send(self, url: str, event: str = "completed", **data) -> str:
        delivery_id = f"msg_{uuid.uuid4().hex}"
        send_webhook(self.app, self.settings, url=url, owner=OWNER, event=event, data=data, delivery_id=delivery_id)
        return delivery_id

    def wait_logged(self, *fragments: str, timeout_s: float = 30) -> None:
        wait_for(
            lambda: any(all(f in line for f in fragments) for line in self.server.log().splitlines()),
            timeout_s,
            f"a log line with {fragments}",
            self.server.proc,
        )

    def stop(self) -> None:
        self.server.stop()
        self.app.close()


@pytest.fixture(scope="module")
def hooks(redis_server, work_dir):
    hooks = Hooks(hooks_env(redis_server, work_dir, "test.webhooks.open", allow_private=True), work_dir, "hooks-open")
    yield hooks
    hooks.stop()


@pytest.fixture(scope="module")
def strict_hooks(redis_server, work_dir):
    env = hooks_env(redis_server, work_dir, "test.webhooks.strict", allow_private=False)
    hooks = Hooks(env, work_dir, "hooks-strict")
    yield hooks
    hooks.stop()


@pytest.fixture(scope="module")
def rabbitmq_hooks(redis_server, work_dir):
    if not rabbitmq_available():
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not installed: .ci/run installs Debian's rabbitmq-server")
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    rabbitmq = RabbitMQ(work_dir).start()
    env = hooks_env(redis_server, work_dir, "test.webhooks.rabbitmq", allow_private=True)
    hooks = Hooks({**env, "FLEET_BROKER_URL": rabbitmq.url}, work_dir, "hooks-rabbitmq")
    yield hooks
    hooks.stop()
    rabbitmq.stop()


def test_every_event_is_signed_retried_under_the_same_id_and_accepted_once(hooks, receiver):
    """start, progress and completed arrive verified; the one answered 500 comes again with
    the same webhook-id and body and a valid signature, and each id is accepted once."""
    sent = {
        "start": hooks.send(receiver.url("/ok"), "start", job="j2"),
        "progress": hooks.send(receiver.url("/flaky"), "progress", job="j2", step=10),
        "completed": hooks.send(receiver.url("/ok"), "completed", job="j2", images=1),
    }
    wait_for(lambda: all(receiver.accepted(delivery_id) for delivery_id in sent.values()), 30, "three deliveries")
    for event, delivery_id in sent.items():
        hooks.wait_logged(delivery_id, "delivered")
        requests = receiver.hits(delivery_id=delivery_id)
        assert all(r.valid for r in requests)
        assert [json.loads(r.body)["type"] for r in receiver.accepted(delivery_id)] == [event]
        assert [r.status for r in requests] == ([500, 204] if event == "progress" else [204])
    failed, retried = receiver.hits(delivery_id=sent["progress"])
    assert failed.body == retried.body
    assert json.loads(retried.body)["data"] == {"job": "j2", "step": 10}


def test_a_redirect_is_never_followed_and_counts_as_a_failed_attempt(hooks, receiver):
    """Attempts go on (with backoff) to the URL given until the window closes; the redirect's
    target never hears a thing."""
    delivery_id = hooks.send(receiver.url("/redirect"))
    hooks.wait_logged(delivery_id, "gave up")
    attempts = receiver.hits(delivery_id=delivery_id)
    assert len(attempts) >= 2 and all(r.path == "/redirect" and r.valid for r in attempts)
    assert not receiver.hits("/elsewhere")
    hooks.wait_logged(delivery_id, "attempt 1 failed (HTTP 302 (a redirect: never followed))")


def test_by_default_a_loopback_receiver_is_never_contacted(strict_hooks, receiver):
    """Without FLEET_WEBHOOK_ALLOW_PRIVATE the attempt is refused before any connection, said
    why in the log, and never retried."""
    delivery_id = strict_hooks.send(receiver.url("/ok"))
    strict_hooks.wait_logged(delivery_id, "a loopback address")
    assert not receiver.hits(delivery_id=delivery_id)
    assert sum(delivery_id in line for line in strict_hooks.server.log().splitlines()) == 1


def test_on_rabbitmq_the_retry_waits_in_the_broker_and_arrives(rabbitmq_hooks, receiver):
    """The backoff goes through RabbitMQ's native delayed delivery (a quorum queue behind a
    topic exchange, as job_queue declares it), which counts whole seconds and refuses zero."""
    delivery_id = rabbitmq_hooks.send(receiver.url("/flaky"), "progress", step=3)
    wait_for(lambda: receiver.accepted(delivery_id), 60, "the retried delivery", rabbitmq_hooks.server.proc)
    rabbitmq_hooks.wait_logged(delivery_id, "delivered (HTTP 204) at attempt 2")
    assert [(r.status, r.valid) for r in receiver.hits(delivery_id=delivery_id)] == [(500, True), (204, True)]
