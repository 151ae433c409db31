"""Fine-tuning jobs end to end: exact resumption after kill -9, plain-PEFT reload, CLI behaviour."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from symbiosis import BaseExecutor, load_model
from symbiosis.cli.main import main
from symbiosis.executor_ref import ExecutorRef
from symbiosis.finetune import FineTuneConfig, FineTuneJob, ResumeError, load_config_file, method_config
from symbiosis.finetune.checkpoint import list_checkpoints

from ..equivalence import assert_close
from ..usermodels import EXAMPLE_DATA

ADAPTER_FILE = "adapter_model.safetensors"


def finetune_cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "symbiosis.cli.main", "finetune", *map(str, args)]


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def assert_same_adapter(a: Path, b: Path) -> None:
    tensors_a, tensors_b = load_file(a / ADAPTER_FILE), load_file(b / ADAPTER_FILE)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), f"{name} differs"


def test_resume_after_kill_9_equals_the_uninterrupted_run(chat_model_dir, tmp_path):
    """SIGKILL a real job after its first checkpoints; the resumed job ends bit-identical to a clean run."""
    common = [
        "--model", chat_model_dir, "--data", EXAMPLE_DATA / "chat.jsonl", "--method", "lora", "--dropout", "0.1",
        "--max-steps", "36", "--save-every", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2",
        "--eval-every", "6", "--no-progress",
    ]  # fmt: skip
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    subprocess.run(finetune_cli(*common, "--output", reference), check=True, capture_output=True, timeout=300)

    process = subprocess.Popen(finetune_cli(*common, "--output", victim), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(int(p.name.split("-")[1]) >= 8 for p in list_checkpoints(victim / "checkpoints")):
        assert process.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (victim / ADAPTER_FILE).exists()
    killed_at = max(r["step"] for r in read_log(victim))
    assert killed_at < 36

    resumed = subprocess.run(finetune_cli(*common, "--output", victim, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_same_adapter(victim, reference)
    steps = [r["step"] for r in read_log(victim) if "loss" in r]
    assert steps == list(range(1, 37))  # each step logged exactly once
    for key in ("loss", "eval_loss"):
        assert [r[key] for r in read_log(victim) if key in r] == [r[key] for r in read_log(reference) if key in r]


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix-tuning"])
def test_saved_adapter_reproduces_the_client_with_plain_peft(chat_model_dir, tmp_path, method):
    """The adapter a job saves loads with PeftModel.from_pretrained on the monolithic model and gives the same outputs."""
    executor = ExecutorRef(BaseExecutor.from_pretrained(chat_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    config = FineTuneConfig(
        data=[EXAMPLE_DATA / "qa.jsonl"], output=tmp_path / "out", peft=method_config(method, num_virtual_tokens=4),
        max_steps=6, batch_size=4, learning_rate=5e-2, save_every=3,
    )  # fmt: skip
    result = FineTuneJob(config, executor, tokenizer).run(progress=False)
    assert result.steps == 6 and result.eval_loss is not None

    client = PeftModel.from_pretrained(load_model(executor.target), result.adapter_dir).eval()
    mono = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model_dir), result.adapter_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir).eval()
    prompt = tokenizer(["Question: What is the opposite of hot?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        logits_client, logits_mono, logits_base = (m(**prompt).logits for m in (client, mono, base))
        assert_close(logits_client, logits_mono, "logits")
        assert (logits_mono - logits_base).abs().max() > 1e-3, "the trained adapter changed nothing"
        generated = [m.generate(**prompt, max_new_tokens=8, do_sample=False) for m in (client, mono)]
    assert torch.equal(generated[0], generated[1])


def test_job_reads_a_peft_config_file_and_records_eval_loss(chat_model_dir, tmp_path, capsys):
    config_file = tmp_path / "loha.json"
    config_file.write_text(json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
    args = ["--model", chat_model_dir, "--data", EXAMPLE_DATA / "text.jsonl", "--peft-config", config_file, "--max-steps", "4", "--save-every", "2"]
    assert main(["finetune", *map(str, args), "--output", str(tmp_path / "out")]) == 0
    stderr = capsys.readouterr().err
    assert "loss=" in stderr and "tok_s=" in stderr and "eval_loss=" in stderr  # the progress bar
    saved = load_config_file(tmp_path / "out")
    assert saved.peft_type == "LOHA" and saved.r == 2
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 4]
    assert all(r["tokens_per_s"] > 0 for r in log if "loss" in r)


def test_bad_data_stops_the_job_before_it_starts(chat_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "broken\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["finetune", "--model", str(chat_model_dir), "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert f"{data}:2: not valid JSON" in stderr
    assert f"{data}:3: the conversation has no assistant message" in stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_job_is_resumed_only_when_asked_and_only_with_the_same_settings(chat_model_dir, tmp_path):
    executor = ExecutorRef(BaseExecutor.from_pretrained(chat_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)

    def job(**changes) -> FineTuneJob:
        settings = dict(data=[EXAMPLE_DATA / "text.jsonl"], output=tmp_path / "out", peft=method_config("lora"), max_steps=4, save_every=2)
        return FineTuneJob(FineTuneConfig(**{**settings, **changes}), executor, tokenizer)

    job().run(progress=False)
    with pytest.raises(ResumeError, match="pass --resume"):
        job().run(progress=False)
    with pytest.raises(ResumeError, match=r"settings differ .*learning_rate"):
        job(learning_rate=1.0).run(resume=True, progress=False)
    partial = tmp_path / "out" / "checkpoints" / ".tmp-step-00000004-123"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"torn")
    assert job().run(resume=True, progress=False).steps == 4
    assert not partial.exists()
