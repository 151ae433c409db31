"""The README's flow with real processes: one remote executor (``symbiosis serve``), two fine-tuning
jobs of different methods and an OpenAI server of a third adapter, all on it at once; then the
results load with plain PEFT, and into the running server without a restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import torch
from transformers import AutoTokenizer

from ..usermodels import EXAMPLE_DATA
from .adapters import greedy_reference, monolithic

QUESTION = [{"role": "user", "content": "What is one plus two?"}]


def symbiosis(*args: str | Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "symbiosis.cli.main", *map(str, args)], **popen)


def wait_ready(path: Path, process: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{process.args} did not get ready"
        time.sleep(0.1)
    return json.loads(path.read_text())


def finished(process: subprocess.Popen, timeout: float = 300) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr


def test_two_jobs_and_a_server_share_one_remote_executor(chat_model_dir, tmp_path):
    quiet = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    executor = symbiosis("serve", chat_model_dir, "--port", "0", "--ready-file", tmp_path / "executor.json", **quiet)
    server = None
    try:
        address = wait_ready(tmp_path / "executor.json", executor)["address"]
        remote = ["--executor", address, "--tokenizer", chat_model_dir]
        finished(symbiosis("finetune", *remote, "--data", EXAMPLE_DATA / "qa.jsonl", "--method", "prompt-tuning",
                           "--num-virtual-tokens", "4", "--max-steps", "4", "--output", tmp_path / "qa", **quiet))  # fmt: skip
        server = symbiosis("serve-openai", *remote, "--adapter", f"qa={tmp_path / 'qa'}", "--port", "0", "--ready-file", tmp_path / "server.json", **quiet)
        url = wait_ready(tmp_path / "server.json", server)["url"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        jobs = [
            symbiosis("finetune", *remote, "--data", EXAMPLE_DATA / data, "--method", method, "--max-steps", "8",
                      "--save-every", "4", "--output", tmp_path / name, "--no-progress", **quiet)
            for name, data, method in (("chat-lora", "chat.jsonl", "lora"), ("text-ia3", "text.jsonl", "ia3"))
        ]  # fmt: skip
        answered_while_training = 0
        while any(job.poll() is None for job in jobs):
            answer = client.chat.completions.create(model="qa", messages=QUESTION, max_tokens=6, temperature=0)
            answered_while_training += answer.choices[0].finish_reason in ("stop", "length")
        for job in jobs:
            finished(job)
        assert answered_while_training >= 1

        # the new adapter: plain PEFT on the monolithic model, and the running server, agree
        tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
        prompt = tokenizer(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        expected = greedy_reference(monolithic(chat_model_dir, tmp_path / "chat-lora"), prompt, 8, {2, 4})
        loaded = httpx.post(f"{url}/admin/adapters", json={"name": "chat-lora", "path": str(tmp_path / "chat-lora")}, timeout=120)
        assert loaded.status_code == 201, loaded.text
        answer = client.chat.completions.create(model="chat-lora", messages=QUESTION, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == tokenizer.decode([t for t in expected if t not in (2, 4)], skip_special_tokens=True)
        assert torch.load(tmp_path / "text-ia3" / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True)["step"] == 4
    finally:
        for process in (server, executor):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.communicate(timeout=60)
    assert server.returncode == 0 and executor.returncode == 0
