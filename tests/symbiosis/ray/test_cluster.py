"""Symbiosis on a three-node Ray cluster started on this host (loopback only, declared resources).

One cluster and one deployment (``tiny``: a 3-layer Llama with a tokenizer in 2 shards, deployed by
the ``symbiosis ray deploy`` command in its own process) serve the whole module; the tests run in
file order: placement and equivalence, refused placements, SIGKILL of shard processes while a
client trains and generates, scale-out and scale-in while clients train, a restarted registry,
``symbiosis finetune`` as a Ray task, ``serve-openai`` behind Ray Serve's proxy, the loss of the
node holding the shards, and the status and shutdown commands.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import gc
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from symbiosis import BaseExecutor, load_model
from symbiosis.cli.main import main
from symbiosis.tiny import save_tiny_model_with_tokenizer
from symbiosis.workload import AffineTask, train

from ..equivalence import assert_close, check_equivalence
from ..server.servers import REPO, free_port
from ..usermodels import EXAMPLE_DATA

ray = pytest.importorskip("ray")

sray = pytest.importorskip("symbiosis.ray")

NAME = "tiny"
URL = f"symbiosis+ray://{NAME}"
#: A head without CPUs (the registry and Serve's controller need none; a lost worker never takes the
#: cluster with it) and two workers, each declaring CPUs, memory and a resource naming it. The head
#: notices a dead node within about 1.5 s instead of Ray's default 15 s or so.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
NODES = [
    dict(num_cpus=0, memory=1 << 30, resources={"head": 1}, _system_config=HEALTH_CHECKS),
    *(dict(num_cpus=2, memory=3 << 30, resources={f"worker{i}": 1}) for i in (1, 2)),
]


@pytest.fixture(scope="module")
def cluster():
    from symbiosis.ray.local import local_cluster

    with local_cluster(NODES) as started:
        yield started


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("ray_llama"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def deployed(cluster, model) -> dict:
    """``tiny`` deployed by the command in a process of its own that exits (the deployment outlives it)."""
    command = [sys.executable, "-m", "symbiosis.cli.main", "ray", "deploy", str(model), "--name", NAME, "--shards", "2", "--serve-options", "--threads", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{NAME}: {model}" in done.stdout and done.stdout.count(" ready ") == 2, done.stdout
    yield sray.status(NAME)[0]
    if sray.status():
        sray.shutdown(NAME, grace_s=0)


def replicas(name: str = NAME) -> dict[tuple[int, int], dict]:
    return {(shard["shard"], r["replica"]): r for shard in sray.status(name)[0]["shards"] for r in shard["replicas"]}


def eventually(condition, timeout_s: float = 120.0, what: str = "") -> None:
    """Wait for ``condition()`` (a bound on waiting, not a performance check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            faulthandler.dump_traceback(sys.stderr)  # where every thread of this process waits
        assert time.monotonic() < deadline, f"timed out waiting for {(what() if callable(what) else what) or condition}"
        time.sleep(0.1)


def sigkill(pid: int) -> None:
    """Kill ``pid`` as a crash would and wait until it is gone."""
    process = psutil.Process(pid)
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


def test_each_replica_is_a_placement_group_with_a_bundle_per_shard(deployed, model):
    assert [tuple(shard["layers"]) for shard in deployed["shards"]] == [(0, 2), (2, 3)]
    [(pg_id, group)] = [(k, g) for k, g in ray.util.placement_group_table().items() if g["name"] == f"symbiosis-pg:{NAME}:0"]
    assert group["state"] == "CREATED" and group["strategy"] == "PACK"
    memory = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert list(group["bundles"].values()) == [{"CPU": 1.0, "memory": float(memory)}] * 2
    found = replicas()
    assert {r["state"] for r in found.values()} == {"ready"} and len({r["fingerprint"] for r in found.values()}) == 1
    assert all(r["address"].startswith("symbiosis://127.0.0.1:") for r in found.values())
    # each shard actor runs on the node its bundle was placed on
    assert [found[(shard, 0)]["node_id"] for shard in (0, 1)] == [group["bundles_to_node_id"][i] for i in (0, 1)]


def test_split_through_ray_equals_monolithic(deployed, model):
    """From this process (outside the cluster) and from a Ray task (inside it): the deployment's
    split execution equals the monolithic transformers + PEFT model."""
    check_equivalence(model, lora(), executor=URL)

    ids = torch.tensor([[1, 17, 33, 5, 9, 260]])

    def logits_in_cluster(ids: torch.Tensor) -> torch.Tensor:
        from symbiosis import load_model

        client = load_model(URL)
        with torch.no_grad():
            logits = client(input_ids=ids).logits
        client.symbiosis.transport.close()
        return logits

    inside = ray.get(ray.remote(num_cpus=1)(logits_in_cluster).remote(ids))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    assert_close(inside, expected, "logits from a Ray task")


def test_placements_that_cannot_be_satisfied_are_errors(deployed, model):
    with pytest.raises(sray.PlacementError, match=r"a shard needs 1 CPU, 1 GPU.*no node of the Ray cluster has that much"):
        sray.deploy(model, "gpu", num_gpus_per_shard=1)
    with pytest.raises(sray.PlacementError, match=r"1024.00 GiB memory, and no node"):
        sray.deploy(model, "memory", memory_per_shard=1 << 40)
    with pytest.raises(sray.PlacementError, match=r"3 replicas x 3 shards need 9 CPU.*whole cluster has 4 CPU"):
        sray.deploy(model, "many", shards=3, replicas=3)
    with pytest.raises(sray.PlacementError, match=r"STRICT_SPREAD: 3 shards need 3 nodes that hold 1 CPU.*2 do"):
        sray.deploy(model, "spread", shards=3, strategy="STRICT_SPREAD")
    started = time.monotonic()
    with pytest.raises(sray.PlacementError, match=r"found no room within 2 s; free now: 2 CPU"):  # fits an empty cluster, not this one
        sray.deploy(model, "busy", shards=2, num_cpus_per_shard=2, strategy="STRICT_SPREAD", placement_timeout_s=2)
    assert time.monotonic() - started < 60
    with pytest.raises(sray.DeployError, match="exists already"):
        sray.deploy(model, NAME)
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        sray.deploy(model, "bad", serve_options=["--bogus"])
    with pytest.raises(ValueError, match="--port.*set by the deployment"):
        sray.deploy(model, "bad", serve_options=["--port", "1"])
    with pytest.raises(sray.DeployError, match=r"shard 0 replica 0 of broken failed to start: .*No such file"):
        sray.deploy(model, "broken", serve_options=["--tenants", "/nonexistent/tenants.toml"])
    # nothing is left of the refused deployments
    assert [d["name"] for d in sray.status()] == [NAME]
    groups = [g["name"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert groups == [f"symbiosis-pg:{NAME}:0"]
    assert {e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["name"].startswith("symbiosis-shard:")} == {
        f"symbiosis-shard:{NAME}:0:0",
        f"symbiosis-shard:{NAME}:1:0",
    }


def lora_run(target, *, steps: int = 6, prepare=None):
    """LoRA fine-tuning steps on ``target`` from seed 0; ``prepare(model)`` runs before training."""
    torch.manual_seed(0)
    client = load_model(target, connect_options={"retry_timeout_s": 300, "refresh_s": 1.0} if isinstance(target, str) else None)
    model = get_peft_model(client, lora())
    if prepare is not None:
        prepare(model)
    return model, train(model, AffineTask(256, a=1, b=3), steps=steps, batch_size=2, seq_len=8, lr=1e-2)


def assert_same_training(model, result, reference, ref_result) -> None:
    assert len(result.losses) == len(ref_result.losses)
    assert_close(torch.tensor(result.losses), torch.tensor(ref_result.losses), "losses")
    ref = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert_close(param, ref[name], name)


def test_sigkilled_shards_are_restarted_and_clients_lose_nothing(deployed, model):
    """SIGKILL shard 0's process during step 2's backward pass, and shard 1's while the trained model
    generates: Ray restarts each (new process, new port), the client finds it through the registry,
    and the adapter, the losses and the generated tokens equal an uninterrupted in-process run."""
    reference, ref_result = lora_run(BaseExecutor.from_pretrained(model))
    prompt = torch.tensor([[3, 4, 5, 6]])
    ref_tokens = reference.eval().generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    before = replicas()
    killed = []

    def kill_in_step_2(model) -> None:
        passes = itertools.count()

        def hook(_module, _grad_output) -> None:
            if next(passes) == 2:
                sigkill(before[(0, 0)]["pid"])
                killed.append(0)

        model.base_model.model.model.layers[0].mlp.down_proj.register_full_backward_pre_hook(hook)

    trained, result = lora_run(URL, prepare=kill_in_step_2)
    assert killed == [0]
    assert_same_training(trained, result, reference, ref_result)

    calls = itertools.count()

    def kill_at_token_3(_module, _args) -> None:
        if next(calls) == 3:  # the prompt's pass, then two decoded tokens
            sigkill(before[(1, 0)]["pid"])
            killed.append(1)

    trained.base_model.model.model.layers[2].register_forward_pre_hook(kill_at_token_3)
    tokens = trained.eval().generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert killed == [0, 1] and torch.equal(tokens, ref_tokens)
    transport = trained.base_model.model.symbiosis.transport
    assert transport.failovers >= 2
    after = replicas()
    for key in ((0, 0), (1, 0)):
        assert after[key]["starts"] == 2 and after[key]["pid"] != before[key]["pid"]
        assert after[key]["address"] != before[key]["address"] and after[key]["fingerprint"] == before[key]["fingerprint"]
    transport.close()


class Trainer(threading.Thread):
    """A client fine-tuning with LoRA, one step after another, until told to stop; it records every
    loss and any error. Step ``i`` trains on batch ``i`` of a fixed sequence, so a reference can repeat it."""

    TASK = AffineTask(256, a=3, b=1)

    @classmethod
    def batch(cls, step: int) -> torch.Tensor:
        return cls.TASK.sequences(2, 8, seed=step)

    def __init__(self, seed: int) -> None:
        super().__init__(daemon=True)
        torch.manual_seed(seed)
        self.model = get_peft_model(load_model(URL, connect_options={"retry_timeout_s": 300, "refresh_s": 0.5}), lora())
        self.transport = self.model.base_model.model.symbiosis.transport
        self.seed, self.losses, self.errors = seed, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)
            for step in itertools.count():
                if self.stop.is_set():
                    return
                batch = self.batch(step)
                loss = self.model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                self.losses.append(loss.item())
        except Exception as exc:
            self.errors.append(exc)

    def reference(self, executor: BaseExecutor) -> None:
        """The same steps on ``executor`` in this process: equal losses and adapter."""
        torch.manual_seed(self.seed)
        model = get_peft_model(load_model(executor), lora())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(len(self.losses)):
            batch = self.batch(step)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert_close(torch.tensor(self.losses), torch.tensor(losses), "losses")
        ref = dict(model.named_parameters())
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert_close(param, ref[name], name)


def test_replicas_scale_out_and_in_while_clients_train(deployed, model):
    """Two clients train while a second replica of every shard starts (on every shard one client moves
    onto it and it serves that client's requests; the registry balances each shard, so which client
    moves may differ per shard) and is removed again (the clients move back): no call fails, no step
    is lost or repeated."""
    gc.collect()  # clients of earlier tests that are gone give up their assignments
    eventually(lambda: sum(r["clients"] for r in replicas().values()) == 0, what="earlier clients' leases to end")
    trainers = [Trainer(seed) for seed in (1, 2)]
    for trainer in trainers:
        trainer.start()

    def training(condition, what: str) -> None:
        """Wait for ``condition()`` while the trainers run; an error of theirs ends the wait."""
        state = lambda: f"{what}; trainers: {[(len(t.losses), [e.replica for e in t.transport.endpoints]) for t in trainers]}; clients: {[(k, r['clients'], r['state']) for k, r in replicas().items()]}"  # noqa: E731
        eventually(lambda: condition() or any(t.errors for t in trainers), what=state)
        assert [t.errors for t in trainers] == [[], []]

    try:
        training(lambda: all(len(t.losses) >= 2 for t in trainers), what="training to start")
        sray.scale(NAME, 2)
        on = lambda shard: sorted(e.replica for t in trainers for e in t.transport.endpoints if e.shard == shard)  # noqa: E731
        training(lambda: on(0) == on(1) == [0, 1], what="one client per replica on every shard")
        new = replicas()
        assert {key: r["state"] for key, r in new.items()} == {(0, 0): "ready", (0, 1): "ready", (1, 0): "ready", (1, 1): "ready"}
        steps = [len(t.losses) for t in trainers]
        training(lambda: all(len(t.losses) >= n + 2 for t, n in zip(trainers, steps)), what="steps on the new replicas")
        served = [sray_stats(new[(shard, 1)]["address"]) for shard in (0, 1)]
        assert all(served), "the new replicas served no client"
        sray.scale(NAME, 1)
        assert set(replicas()) == {(0, 0), (1, 0)}
        training(lambda: on(0) == on(1) == [0, 0], what="the clients to move back")
        steps = [len(t.losses) for t in trainers]
        training(lambda: all(len(t.losses) >= n + 2 for t, n in zip(trainers, steps)), what="steps after the scale-in")
    finally:
        for trainer in trainers:
            trainer.stop.set()
            trainer.join(120)
            trainer.transport.close()
        if set(replicas()) != {(0, 0), (1, 0)}:  # a failure above must not leave the next tests a second replica's resources
            sray.scale(NAME, 1)
    assert [t.errors for t in trainers] == [[], []]
    executor = BaseExecutor.from_pretrained(model)
    for trainer in trainers:
        trainer.reference(executor)


def sray_stats(address: str) -> dict:
    """Requests the server at ``address`` completed, per client id."""
    from symbiosis.transport import connect

    transport = connect(address, shared_memory=False)
    try:
        return transport.stats()["completed_by_client"]
    finally:
        transport.close()


def test_a_restarted_registry_recovers_every_deployment(cluster, deployed, model):
    """SIGKILL the registry actor: Ray restarts it, the shard actors report again, a client that was
    running keeps working and renewing, and new clients resolve the deployment as before."""
    before = sray.status(NAME)[0]
    client = load_model(URL, connect_options={"refresh_s": 0.5})
    registry = ray.get_actor("symbiosis-registry", namespace="symbiosis")
    pid = ray.get(registry.pid.remote())
    sigkill(pid)
    eventually(lambda: ray.get(registry.pid.remote()) != pid, what="the registry to restart")
    head = ray.get(registry.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))
    assert head == cluster.head_node.node_id  # where no worker node's loss can take it
    eventually(lambda: sray.status() and all(r["state"] == "ready" for r in replicas().values()) and len(replicas()) == 2, what="shards to report")
    after = sray.status(NAME)[0]
    strip = lambda d: [[{k: r[k] for k in ("replica", "state", "address", "fingerprint", "pid")} for r in s["replicas"]] for s in d["shards"]]  # noqa: E731
    assert after["spec"] == before["spec"] and strip(after) == strip(before)
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
        assert_close(client(input_ids=ids).logits, expected, "logits of a running client")
        fresh = load_model(URL)
        assert_close(fresh(input_ids=ids).logits, expected, "logits of a new client")
    eventually(lambda: sum(r["clients"] for r in replicas().values()) == 4, what="both clients' renewals")  # 2 clients x 2 shards
    for c in (client, fresh):
        c.symbiosis.transport.close()


@pytest.fixture(scope="module")
def finetuned(deployed, model, tmp_path_factory) -> Path:
    """``symbiosis finetune`` run as a Ray task against the deployment."""
    out = tmp_path_factory.mktemp("ray_finetune") / "adapter"
    result = sray.finetune(finetune_args(["--executor", URL, "--tokenizer", str(model)], out), num_cpus=1)
    assert result.returncode == 0, result.stderr
    assert "adapter saved to" in result.stdout
    return out


def finetune_args(executor: list[str], out: Path) -> list[str]:
    """A short LoRA job on the example chat data against ``executor`` (``--model`` or ``--executor`` options)."""
    data = ["--data", str(EXAMPLE_DATA / "chat.jsonl"), "--method", "lora", "--max-steps", "3", "--batch-size", "2"]
    return [*executor, *data, "--lr", "1e-2", "--no-progress", "--output", str(out)]


def test_finetune_runs_as_a_ray_task(finetuned, model, tmp_path):
    """The task's adapter equals the one the same command trains against an in-process executor."""
    assert main(["finetune", *finetune_args(["--model", str(model)], tmp_path / "local")]) == 0
    base = AutoModelForCausalLM.from_pretrained(model)
    on_ray = PeftModel.from_pretrained(copy.deepcopy(base), finetuned)
    local = PeftModel.from_pretrained(base, tmp_path / "local")
    for (name, param), (_, expected) in zip(on_ray.named_parameters(), local.named_parameters()):
        if "lora_" in name:
            assert_close(param, expected, name)
    assert not list(finetuned.glob(".ray-task-*"))


def test_serve_openai_behind_ray_serve(finetuned, model):
    """Two Serve replicas behind Serve's proxy answer the OpenAI API like `symbiosis serve-openai`:
    models, greedy chat completions equal to the monolithic PEFT model, streaming, 404 for an unknown
    model, the engine options given; the adapter set changes on every replica by deploying again;
    /admin writes are refused."""
    openai = pytest.importorskip("openai")
    from ray import serve

    port = free_port()
    engine = {"max_seqs": 2, "max_step_tokens": 64, "block_size": 8, "max_adapters": 4}  # serve-openai's engine options
    with pytest.raises(ValueError, match=r"unknown engine options \['max_rows'\]"):
        sray.serve_openai("chat", executor=URL, tokenizer=model, engine_options={"max_rows": 2}, http_port=port)
    url = sray.serve_openai(
        "chat", executor=URL, tokenizer=model, adapters={"qa": finetuned}, engine_options=engine, replicas=2, num_cpus=0.5, http_port=port, proxy_location="HeadOnly"
    )
    try:
        assert url == f"http://127.0.0.1:{port}/v1" and serve.status().applications["chat"].status == "RUNNING"
        client = openai.OpenAI(base_url=url, api_key="unused")
        question = [{"role": "user", "content": "What is the opposite of up?"}]
        tokenizer = AutoTokenizer.from_pretrained(model)
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), finetuned).eval()
        inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        output = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for _ in range(4):  # requests land on both replicas
            assert sorted(m.id for m in client.models.list()) == ["base", "qa"]
            answer = client.chat.completions.create(model="qa", messages=question, max_tokens=8, temperature=0)
            assert answer.choices[0].message.content == expected
        chunks = client.chat.completions.create(model="qa", messages=question, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="n=3 exceeds this server's 2 running sequences"):  # the replicas' engines took the options
            client.completions.create(model="qa", prompt="hi", max_tokens=2, n=3)
        import httpx

        refused = httpx.post(f"http://127.0.0.1:{port}/admin/adapters", json={"name": "x", "path": str(finetuned)}, timeout=60)
        assert refused.status_code == 409 and "symbiosis ray serve-openai" in refused.json()["error"]["message"]
        sray.serve_openai("chat", executor=URL, tokenizer=model, adapters={}, engine_options=engine, replicas=2, num_cpus=0.5, http_port=port)
        for _ in range(4):
            assert [m.id for m in client.models.list()] == ["base"]
    finally:
        sray.delete_openai("chat")


def test_shards_of_a_lost_node_restart_on_another(cluster, deployed, model):
    """The node holding the shards dies (its raylet and every process on it killed): Ray places the
    replica's bundles on the other node and restarts the actors there; a running client re-resolves
    and gets the same answers."""
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    client = load_model(URL, connect_options={"retry_timeout_s": 300})
    before = replicas()
    [lost] = {r["node_id"] for r in before.values()}  # PACK: the replica's two shards share a node
    # a host that dies takes every process with it: its raylet, and the shard processes (which, on
    # this machine, would otherwise go on serving for a few seconds until they notice the raylet gone)
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == lost), allow_graceful=False)
    for r in before.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            sigkill(r["pid"])
    with torch.no_grad():
        assert_close(client(input_ids=ids).logits, expected, "logits after the node's loss")
    after = replicas()
    assert {r["state"] for r in after.values()} == {"ready"} and lost not in {r["node_id"] for r in after.values()}
    assert all(after[key]["pid"] != before[key]["pid"] for key in before), "the shards were not restarted"
    client.symbiosis.transport.close()


def test_status_and_shutdown_commands(deployed, capsys):
    assert main(["ray", "status"]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"{NAME}: ") and "2 shards, PACK, 1 CPU" in table and table.count(" ready ") == 2
    assert main(["ray", "status", NAME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == NAME
    assert main(["ray", "status", "nope"]) == 2
    assert "no Symbiosis deployment named 'nope'" in capsys.readouterr().err
    assert main(["ray", "shutdown", NAME]) == 0
    assert sray.status() == []
    assert not [e for e in ray.util.list_named_actors(all_namespaces=True) if e["name"].startswith("symbiosis-shard:")]
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
    with pytest.raises(sray.DeploymentNotFoundError, match="no Symbiosis deployment named 'tiny'"):
        load_model(URL)
