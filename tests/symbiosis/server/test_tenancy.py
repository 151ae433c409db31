"""Tenants: tokens, limits with clear errors, isolation of results, TLS."""

from __future__ import annotations

import datetime
import json
import threading

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from symbiosis import BaseExecutor, load_model
from symbiosis.errors import AuthenticationError, ExecutorUnavailableError, LimitExceededError
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer, TenantRegistry
from symbiosis.server.tenancy import token_digest
from symbiosis.transport import RemoteTransport

OP = "model.layers.0.self_attn.o_proj"
TENANTS_TOML = f"""
[[tenants]]
name = "alice"
token = "alice-secret"

[[tenants]]
name = "bob"
token_sha256 = "{token_digest('bob-secret')}"
priority = 1
[tenants.limits]
rows_per_request = 8
payload_bytes = 1024
requests_per_second = 1000
"""


@pytest.fixture(scope="module")
def executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=0.0)


@pytest.fixture
def server_with(executor):
    started = []

    def start(registry: TenantRegistry, **options) -> ExecutorServer:
        started.append(ExecutorServer(executor, registry=registry, **options).start())
        return started[-1]

    yield start
    for server in started:
        server.stop(1.0)


def call(transport: RemoteTransport, rows: int = 2, op: str = OP) -> torch.Tensor:
    return transport.run(OpRequest(op, Direction.FORWARD, torch.randn(rows, 64)))


def test_tenants_file_formats(tmp_path):
    toml = tmp_path / "tenants.toml"
    toml.write_text(TENANTS_TOML)
    as_json = tmp_path / "tenants.json"
    as_json.write_text(json.dumps({"tenants": [{"name": "carol", "token": "c", "stats": True, "limits": {"concurrent_requests": 2}}]}))
    assert [t.name for t in TenantRegistry.from_file(toml).tenants()] == ["alice", "bob"]
    assert TenantRegistry.from_file(toml).authenticate("bob-secret").tenant.limits.payload_bytes == 1024
    assert TenantRegistry.from_file(as_json).authenticate("c").tenant.limits.concurrent_requests == 2
    assert TenantRegistry.from_file(as_json).authenticate("c").tenant.stats and not TenantRegistry.from_file(toml).authenticate("alice-secret").tenant.stats
    for bad in (
        {"tenants": []},
        {"tenants": [{"name": "x"}]},
        {"tenants": [{"name": "x", "token": "t", "limits": {"rows": 3}}]},
        {"tenants": [{"name": "x", "token": "t", "limits": {"payload_bytes": -1}}]},
        {"tenants": [{"name": "x", "token": "t"}, {"name": "y", "token": "t"}]},
        {"tenants": [{"name": "x", "token": "t", "colour": "red"}]},
        {"tenants": [{"name": "x", "token": "t", "stats": "yes"}]},
    ):
        with pytest.raises(ValueError):
            TenantRegistry.from_dict(bad)


def test_tokens_are_required_and_checked(server_with, model_dir):
    server = server_with(TenantRegistry.from_dict({"tenants": [{"name": "alice", "token": "alice-secret"}]}))
    with pytest.raises(AuthenticationError, match="requires a token"):
        load_model(server.url)
    with pytest.raises(AuthenticationError, match="unknown token"):
        call(RemoteTransport(f"127.0.0.1:{server.port}", token="wrong"))
    client = load_model(server.url, token="alice-secret")
    assert client(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)


def test_limits_give_clear_errors(server_with, tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS_TOML)
    server = server_with(TenantRegistry.from_file(path))
    for shared_memory in (False, True):
        bob = RemoteTransport(f"127.0.0.1:{server.port}", token="bob-secret", shared_memory=shared_memory)
        assert call(bob, rows=4).shape == (4, 64)
        with pytest.raises(LimitExceededError, match="tenant 'bob': 9 rows exceed the limit of 8 rows per request"):
            call(bob, rows=9)
        bob.close()
    with pytest.raises(LimitExceededError, match="bytes exceed the limit of 1024 bytes"):
        call(RemoteTransport(f"127.0.0.1:{server.port}", token="bob-secret", shared_memory=False), rows=5, op="model.layers.0.mlp.down_proj")
    alice = RemoteTransport(f"127.0.0.1:{server.port}", token="alice-secret")
    assert call(alice, rows=64).shape == (64, 64)  # alice has no limits


#: Each lane a client thread's calls can take (repeated calls on a channel run from a kept plan:
#: its limits must hold there too).
LANES = {
    "shm": {"shared_memory": True},
    "tcp": {"shared_memory": False, "data_channel": True},
    "grpc": {"shared_memory": False, "data_channel": False},
}


@pytest.mark.parametrize("lane", LANES)
def test_rate_limit(server_with, lane):
    registry = TenantRegistry.from_dict({"tenants": [{"name": "slow", "token": "s", "limits": {"requests_per_second": 1}}]})
    transport = RemoteTransport(f"127.0.0.1:{server_with(registry).port}", token="s", **LANES[lane])
    call(transport)
    with pytest.raises(LimitExceededError, match="more than 1 requests per second"):
        for _ in range(5):  # a bucket of one token refills at 1/s: five calls in a row cannot all pass
            call(transport)


@pytest.mark.parametrize("lane", LANES)
def test_concurrency_and_session_limits(model_dir, hold_batches, lane):
    slow = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=0.5))  # every request waits 0.5 s for a batch
    registry = TenantRegistry.from_dict(
        {"tenants": [{"name": "one", "token": "t", "limits": {"concurrent_requests": 1, "sessions": 3}}]}
    )
    server = ExecutorServer(slow, registry=registry).start()
    try:
        transport = RemoteTransport(f"127.0.0.1:{server.port}", token="t", **LANES[lane])
        call(transport)  # the same call: on a channel kept by this thread, a repeat
        errors: list[BaseException] = []
        started = threading.Barrier(2)

        def worker() -> None:
            started.wait()
            try:
                call(transport)
            except LimitExceededError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(errors) == 1 and "more than 1 concurrent requests" in str(errors[0])
    finally:
        server.stop(1.0)


def test_session_limit(server_with):
    """Each client thread holds a session; a third one beyond the limit of two is refused."""
    registry = TenantRegistry.from_dict({"tenants": [{"name": "two", "token": "t", "limits": {"sessions": 2}}]})
    transport = RemoteTransport(f"127.0.0.1:{server_with(registry).port}", token="t", shared_memory=False)
    release = threading.Event()
    ready = threading.Semaphore(0)

    def holder() -> None:
        call(transport)
        ready.release()
        release.wait()  # the thread, and so its session, stays alive

    holders = [threading.Thread(target=holder) for _ in range(2)]
    for thread in holders:
        thread.start()
        ready.acquire()
    try:
        with pytest.raises(LimitExceededError, match="more than 2 open sessions"):
            call(transport)
    finally:
        release.set()
        for thread in holders:
            thread.join()


def test_tenants_get_only_their_own_results(model_dir, hold_batches):
    """Two tenants hammer the same op at once, batched together; each gets exactly its own rows."""
    batching = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=0.005))  # let batches fill
    registry = TenantRegistry.from_dict({"tenants": [{"name": "a", "token": "ta"}, {"name": "b", "token": "tb"}]})
    server = ExecutorServer(batching, registry=registry).start()
    weight = batching.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    failures: list[str] = []

    def tenant(token: str, seed: int) -> None:
        transport = RemoteTransport(f"127.0.0.1:{server.port}", token=token)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(100):
            x = torch.randn(3, 64, generator=generator)
            y = transport.run(OpRequest(OP, Direction.FORWARD, x, client_id=f"tenant-{token}"))
            if not torch.allclose(y, x @ weight.t(), atol=1e-5):
                failures.append(token)

    threads = [threading.Thread(target=tenant, args=(token, seed)) for seed, token in enumerate(["ta", "tb", "ta", "tb"])]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.stop(1.0)
    assert failures == []
    # each tenant uses one client id, so a GEMM that served two clients served both tenants
    assert batching.stats.per_op()[OP, Direction.FORWARD].shared_gemms > 0, "no batch mixed the tenants"


def test_stats_show_a_tenant_only_its_own_traffic(server_with):
    """Every tenant sees its own per-client counts; the executor's batch statistics and queue depth,
    which reflect all tenants' traffic, only a tenant with ``stats = true``."""
    registry = TenantRegistry.from_dict({"tenants": [{"name": "a", "token": "ta"}, {"name": "ops", "token": "to", "stats": True}]})
    server = server_with(registry)
    tenant_a = RemoteTransport(f"127.0.0.1:{server.port}", token="ta")
    operator = RemoteTransport(f"127.0.0.1:{server.port}", token="to")
    tenant_a.run(OpRequest(OP, Direction.FORWARD, torch.randn(2, 64), client_id="a1"))
    operator.run(OpRequest(OP, Direction.FORWARD, torch.randn(2, 64), client_id="o1"))
    assert tenant_a.stats() == {"completed_by_client": {"a1": 1}}
    seen = operator.stats()
    assert seen["completed_by_client"] == {"o1": 1} and seen["total"]["requests"] >= 2 and {"ops", "queue_depth"} <= set(seen)


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls(server_with, tmp_path):
    cert, key = _self_signed()
    (tmp_path / "ca.pem").write_bytes(cert)
    server = server_with(TenantRegistry.from_dict({"tenants": [{"name": "a", "token": "ta"}]}), host="localhost", tls=(cert, key))
    assert server.url.startswith("symbiosis+tls://localhost:")
    client = load_model(server.url, token="ta", connect_options={"tls_ca": tmp_path / "ca.pem", "shared_memory": False})
    assert client(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
    untrusted = RemoteTransport(f"localhost:{server.port}", token="ta", tls=True, retry_timeout_s=0.5)
    with pytest.raises(ExecutorUnavailableError):
        untrusted.spec()  # the self-signed certificate is not among the system's roots
    plaintext = RemoteTransport(f"localhost:{server.port}", token="ta", retry_timeout_s=0.5)
    with pytest.raises(ExecutorUnavailableError):
        plaintext.spec()
