"""Every bad input to ``python -m fedlora.simulate`` is one line on stderr, exit code 2.

One table over the whole surface: command-line keys and values, data files, the model, the
output and resume directories. Each case runs the real command in a subprocess (the worktree's
code through PYTHONPATH) and must be refused before Ray starts: exactly one non-empty stderr
line that names the key or file and says how to fix it, no traceback, no Ray start-up output,
no results written. The deployment launcher's run-config check is the last test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

GOOD_JSONL = "".join(json.dumps({"text": f"text number {i}", "label": i % 2}) + "\n" for i in range(20))


def real_truncated_checkpoint(run_dir: Path) -> None:
    """A checkpoint.pt and config.yaml written by the real server loop (one round on the fake
    grid and tiny model of the resume tests), then cut to half its bytes, as a copy cut short."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.run.checkpoint import CHECKPOINT
    from fedlora.run.server import run_server
    from tests.test_resume import SeededGrid, fresh_clients, make_run
    from tests.test_server_loop import make_tiny_bundle

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        bundle = make_tiny_bundle()
        cfg, data = make_run("fedavg", rounds=1, checkpoint_every=1)
        run_server(SeededGrid(fresh_clients(bundle, 100)), cfg, run_dir, bundle, data)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    checkpoint = run_dir / CHECKPOINT
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[:len(whole) // 2])


def minilm_config_only(folder: Path) -> None:
    """A model folder with the real model's config.json but no weights and no tokenizer."""
    from fedlora.model.pretrained import model_path

    folder.mkdir()
    (folder / "config.json").write_text((Path(model_path("minilm")) / "config.json").read_text())


def tiny_llama_folder(folder: Path) -> None:
    """A causal LM folder: a tiny random Llama with a one-token-per-character tokenizer."""
    from tests.test_generation_task import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


GOOD_SFT = "".join(f'{{"prompt": "What is {i} + {i}?", "response": "{2 * i}"}}\n' for i in range(20))


# id: (files to create under tmp_path {name: text | bytes | None for a folder | callable(path)},
#      command-line args ({tmp} is tmp_path), substrings the one stderr line must hold)
CASES = {
    # keys and values (checked before Hydra or by RunConfig)
    "unknown key": ({}, ["learning_rate=0.1"],
                    ["'learning_rate' is not a fedlora setting", "fedlora/conf/config.yaml"]),
    "unknown nested key": ({}, ["fedsb.init_sample=4"],
                           ["'fedsb.init_sample' is not a fedlora setting", "valid keys"]),
    "bad strategy": ({}, ["strategy=fedsbb"],
                     ["strategy 'fedsbb' is unknown", "choose one of: fedavg"]),
    "bad group choice": ({}, ["partition=zipf"],
                         ["partition 'zipf' is unknown", "choose one of: dirichlet, iid"]),
    "bad number": ({}, ["rank=0"], ["rank=0", "set rank >= 1"]),
    "not a number": ({}, ["local_steps=eight"], ["local_steps='eight' is not a number", "set local_steps"]),
    # data files
    "data path missing": ({}, ["data.path={tmp}/no-such-data"],
                          ["data.path='{tmp}/no-such-data' does not exist", "give a directory"]),
    "jsonl row without label": (
        {"d.jsonl": GOOD_JSONL + '{"text": "no label here"}\n' + GOOD_JSONL},
        ["data.path={tmp}/d.jsonl"], ["'{tmp}/d.jsonl' line 21", "'label'", "add it"]),
    "sft row without response": (
        {"d.jsonl": GOOD_SFT + '{"prompt": "What is 1 + 2?"}\n' + GOOD_SFT},
        ["task=sft", "data.path={tmp}/d.jsonl"],
        ["'{tmp}/d.jsonl' line 21 has no 'response' (data.response_field)", "add it"]),
    "sft empty response": (
        {"d.jsonl": GOOD_SFT + '{"prompt": "What is 1 + 2?", "response": "  "}\n'},
        ["task=sft", "data.path={tmp}/d.jsonl"],
        ["'{tmp}/d.jsonl' line 21 has an empty response (data.response_field='response')",
         "fill it in or remove the row"]),
    "sft response longer than max_length": (
        {"llama": tiny_llama_folder,
         "d.jsonl": GOOD_SFT + '{"prompt": "Spell it", "response": "' + "x" * 40 + '"}\n'},
        ["task=sft", "model={tmp}/llama", "data.path={tmp}/d.jsonl", "max_length=24"],
        ["max_length=24 is too short: a response needs 41 tokens", "raise max_length to at least 42"]),
    "generative task on a classifier folder": (
        {"bert": minilm_config_only}, ["task=arithmetic", "model={tmp}/bert"],
        ["is not a causal language model (its config.json names BertModel)",
         "task=arithmetic generates text"]),
    "malformed jsonl line": ({"d.jsonl": GOOD_JSONL + '{"text": "cut", "lab\n'},
                             ["data.path={tmp}/d.jsonl"],
                             ["'{tmp}/d.jsonl' line 21 is not valid JSON", "fix that line"]),
    "csv without text column": ({"d.csv": "sentence,label\nhello,0\nworld,1\n"},
                                ["data.path={tmp}/d.csv"],
                                ["data.text_field='text' is not a column of '{tmp}/d.csv'",
                                 "columns: sentence, label", "set data.text_field"]),
    "non-utf8 file": ({"d.csv": b"text,label\nna\xefve caf\xe9,0\nworld,1\n"},
                      ["data.path={tmp}/d.csv"],
                      ["'{tmp}/d.csv' is not UTF-8", "save it as UTF-8"]),
    "test file but no train file": ({"data": None, "data/test.jsonl": GOOD_JSONL},
                                    ["data.path={tmp}/data"],
                                    ["data.path='{tmp}/data' has no train.jsonl or train.csv",
                                     "add one"]),
    # the model
    "model folder without a model": ({"empty-model": None}, ["model={tmp}/empty-model"],
                                     ["model='{tmp}/empty-model' holds no model", "save_pretrained"]),
    "model folder with config only": ({"half-model": minilm_config_only},
                                      ["model={tmp}/half-model"],
                                      ["model='{tmp}/half-model' could not be loaded",
                                       "local model directory"]),
    "model absolute path missing": ({}, ["model={tmp}/no-such-model"],
                                    ["model='{tmp}/no-such-model' could not be loaded: no such directory",
                                     "Hugging Face model id"]),
    "4-bit base weights on cpu": ({}, ["quantization=4"],
                                  ["quantization=4 loads the base weights through bitsandbytes, "
                                   "which needs a CUDA GPU", "or quantization=null"]),
    "model relative path missing": ({}, ["model=./no-such-model"],
                                    ["model='./no-such-model' could not be loaded: no such directory",
                                     "local model directory"]),
    # output and resume directories (the tests run as root: chmod does not stop root, so these
    # are places nobody can write: under a regular file, in /proc, and /sys/kernel)
    "out under a regular file": ({"file": "x"}, ["out={tmp}/file/run"],
                                 ["out={tmp}/file/run cannot be created", "Not a directory",
                                  "give a directory you can write"]),
    "out under proc": ({}, ["out=/proc/fedlora-no-such/run"],
                       ["out=/proc/fedlora-no-such/run cannot be created",
                        "give a directory you can write"]),
    "out read-only": ({}, ["out=/sys/kernel"],
                      ["out=/sys/kernel cannot be created or written",
                       "give a directory you can write"]),
    "resume missing": ({}, ["resume={tmp}/no-such-run"],
                       ["resume={tmp}/no-such-run has no checkpoint.pt", "give the directory of a run"]),
    "resume truncated checkpoint": ({"run": real_truncated_checkpoint}, ["resume={tmp}/run"],
                                    ["resume={tmp}/run", "checkpoint.pt is damaged or cut short",
                                     "copy the file again whole"]),
}


def make_files(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir()
        elif callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def run_simulate(root: Path, args: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the command in ``root``, where the case's files are (a writable out= unless the case
    sets its own; ``clients=2 rounds=1`` unless it resumes); return the arguments and the
    finished process."""
    args = [a.replace("{tmp}", str(root)) for a in args]
    if not any(a.startswith("resume=") for a in args):  # a resumed run keeps its own config
        args += ["clients=2", "rounds=1"]
        if not any(a.startswith("out=") for a in args):
            args.append(f"out={root}/out")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return args, subprocess.run([sys.executable, "-m", "fedlora.simulate", *args], cwd=root,
                                env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's command, three at a time: each spends seconds importing torch and Hydra, so
    one after the other the table would take minutes on a small machine."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("bad-inputs")
    for index, (files, _, _) in enumerate(CASES.values()):  # files first: some run code in-process
        (base / str(index)).mkdir()
        make_files(base / str(index), files)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case: pool.submit(run_simulate, base / str(i), CASES[case][1])
                   for i, case in enumerate(CASES)}
        return {case: (base / str(i), *future.result()) for i, (case, future) in enumerate(futures.items())}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_on_stderr_and_exit_2(outcomes, case):
    # Prepare / Execute: the case's files and command (the ``outcomes`` fixture)
    root, args, done = outcomes[case]
    expected = [text.replace("{tmp}", str(root)) for text in CASES[case][2]]
    # Assert: exit code 2, one line naming the key or file and the fix, nothing else started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for substring in expected:
        assert substring in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not re.search(r"\bRay\b|ray\.init|raylet", done.stdout + done.stderr)
    assert not list(root.rglob("results.jsonl")) or case == "resume truncated checkpoint"


def test_deployment_refuses_an_undeclared_run_config_key_before_starting(tmp_path):
    """Flower's SuperLink refuses a ``--run-config`` key that pyproject.toml does not declare
    (``fuse_dicts(check_keys=True)`` in StartRun) only once the federation is up; the launcher
    checks the run config it builds against pyproject.toml first."""
    import tomllib

    from flwr.common.config import flatten_dict, fuse_dicts

    from fedlora.deploy import check_declared, flat_run_config, resolve_config
    from fedlora.core.errors import ConfigError

    # Prepare: the run config the launcher builds for a DP run, and Flower's declared keys
    declared = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())
                            ["tool"]["flwr"]["app"]["config"])
    _, raw = resolve_config(["dp=on", "participation.mean_p=0.5", "partition=pathological"], 2)
    built = flat_run_config({**raw, "out": str(tmp_path)})
    # Execute / Assert: every key the launcher sends is declared, so Flower accepts it ...
    check_declared(built)
    assert fuse_dicts(declared, built, check_keys=True).keys() == declared.keys()
    # ... and one that is not declared is refused, by Flower and, first, by the launcher
    with pytest.raises(ValueError, match="'fedsb.init_sample' is not present"):
        fuse_dicts(declared, {**built, "fedsb.init_sample": 4}, check_keys=True)
    with pytest.raises(ConfigError, match=r"'fedsb.init_sample' is not declared in .*pyproject.toml"
                                          r" \[tool.flwr.app.config\], so flwr run would refuse"):
        check_declared({**built, "fedsb.init_sample": 4})
    # The command itself: an unknown key is one line, exit 2, before anything starts
    done = subprocess.run([sys.executable, "-m", "fedlora.deploy", "local", "nodes=2",
                           "fedsb.init_sample=4", f"out={tmp_path}/run"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "'fedsb.init_sample' is not a fedlora setting" in lines[0]
    assert not (tmp_path / "run" / "deploy").exists()  # no certificates, no SuperLink
