"""Deployment (``fedlora.deploy``): certificates, the run config ``flwr run`` gets, refusal of
nodes that are not registered or not on TLS, and a loopback federation end to end.

The federation tests start real Flower processes (``flower-superlink``, ``flower-supernode``)
on free loopback ports; every process they start is stopped by the test.
"""

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from fedlora.deploy import (LocalFederation, flat_run_config, main, parse_deploy_args,
                            resolve_config, toml_lines, write_certificates)
from fedlora.core.errors import ConfigError
from fedlora.run.server import config_from_run_config
from fedlora.strategies import STRATEGIES

REPO = Path(__file__).resolve().parent.parent


def test_certificates_chain_to_the_ca_and_name_the_loopback(tmp_path):
    # Execute
    files = write_certificates(tmp_path, nodes=3, hosts=("10.1.2.3", "link.example"))
    # Assert: the server certificate is signed by the CA and valid for every address given
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    key = load_pem_private_key(files["server_key"].read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    # Node keys: ECDSA P-384 in OpenSSH format, as ssh-keygen -t ecdsa -b 384 writes them
    assert [p.name for p in files["nodes"]] == ["node_0", "node_1", "node_2"]
    publics = set()
    for path in files["nodes"]:
        private = load_ssh_private_key(path.read_bytes(), password=None)
        assert isinstance(private.curve, ec.SECP384R1)
        public = path.with_name(path.name + ".pub").read_text()
        assert public.startswith("ecdsa-sha2-nistp384 ") and public.rstrip().endswith(path.name)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        publics.add(public)
    assert len(publics) == 3


def test_certificates_folder_and_private_keys_are_the_owners_only(tmp_path):
    # Prepare: an existing folder others can read, and a stale key file others can read
    folder = tmp_path / "certs"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "ca.key").write_text("old")
    (folder / "ca.key").chmod(0o644)
    # Execute
    files = write_certificates(folder, nodes=2)
    # Assert: 0700 folder; every private key 0600; only certificates and public keys readable
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    private = {folder / "ca.key", files["server_key"], *files["nodes"]}
    for path in folder.iterdir():
        mode = oct(path.stat().st_mode & 0o777)
        assert (mode == "0o600") if path in private else path.suffix in (".crt", ".pub"), (path, mode)
    assert (folder / "ca.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("argv, message", [
    (["strategy=fedavg"], "nodes is required"),
    (["nodes=0"], "nodes=0 must be a positive integer"),
    (["nodes=3", "clients=5"], "clients=5 differs from nodes=3"),
    (["nodes=3", "kill_node=3@2"], "kill_node=3@2 must be NODE@ROUND with 0 <= NODE < 3"),
    (["nodes=2", "node_isolation=thread"], "node_isolation 'thread' is unknown; choose one of: warm, subprocess"),
    (["nodes=3", "node_config.3=dp-required=true"], 'node_config.3 names no node: use '
     'node_config="..." for every node or node_config.I="..." with 0 <= I < 3'),
    (["nodes=2", 'node_config=dp-max-epsilon="lots"'], "node_config: node config "
     "dp-max-epsilon='lots' must be a positive finite number"),
    (["nodes=2", "node_config.0=dp-max-eps=1"], "node_config.0: node config key dp-max-eps is "
     "unknown; the policy keys are dp-required, dp-max-epsilon, dp-delta, dp-secret-noise-only"),
    (["nodes=2", "node_config=partition-id=1"], "node_config sets partition-id, which deploy "
     "sets itself (node I holds partition I of nodes=2); drop it"),
    (["nodes=2", "node_config=dp-required"], "node_config='dp-required' is not a list of "
     'key=value pairs (values: true, false, numbers or "quoted strings"); write e.g. '
     'node_config="dp-required=true dp-max-epsilon=8"'),
    (["nodes=2", "node_config=dp-max-epsilon=lots"], "node_config='dp-max-epsilon=lots' is not "
     "a list of key=value pairs"),
])
def test_bad_deploy_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_deploy_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["nodes=two"], "error: nodes='two' is not a number of type int; set nodes to one\n"),
    (["node=2"], "error: 'node' is not a fedlora setting; valid keys: nodes, hosts\n"),
])
def test_bad_certs_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    # Execute
    code = main(["certs", str(tmp_path / "certs"), *argv])
    # Assert: exit 2, one line, nothing written
    assert code == 2 and capsys.readouterr().err == message
    assert not (tmp_path / "certs").exists()


def test_bad_key_stops_before_any_process_starts(tmp_path, capsys):
    # Execute
    code = main(["local", "nodes=2", "strategy=fedsbb", f"out={tmp_path}"])
    # Assert: exit 2, one line on stderr, nothing written or started
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: strategy 'fedsbb' is unknown; choose one of: {', '.join(sorted(STRATEGIES))}\n"
    assert not (tmp_path / "deploy").exists()


def test_parsed_arguments(tmp_path):
    options, overrides = parse_deploy_args(["nodes=4", "strategy=fedsb", "kill_node=1@2", "rounds=3",
                                            f"secrets={tmp_path}", "node_config=dp-required=true",
                                            'node_config.1=dp-max-epsilon=1 data.path="/d/x.jsonl"',
                                            "node_config.2=dp-secret-noise-only=false"])
    assert options == {"nodes": 4, "isolation": "warm", "kill": (1, 2), "secrets": tmp_path,
                       "node_configs": [
                           {"dp-secret-noise-only": True, "dp-required": True},
                           {"dp-secret-noise-only": True, "dp-required": True,
                            "dp-max-epsilon": 1, "data.path": "/d/x.jsonl"},
                           {"dp-secret-noise-only": False, "dp-required": True},
                           {"dp-secret-noise-only": True, "dp-required": True}]}
    assert overrides == ["strategy=fedsb", "rounds=3"]


def test_a_supernode_gets_its_node_config_as_flower_parses_it():
    """The ``--node-config`` string a SuperNode gets reads back, with Flower's own parser, as
    its partition and the node config deploy parsed (the policy as the ClientApp reads it)."""
    from flwr.common.config import parse_config_args

    from fedlora.clients.policy import NodePolicy
    from fedlora.deploy import node_config_text

    extra = {"dp-secret-noise-only": True, "dp-max-epsilon": 1.5, "data.path": "/srv/data.jsonl"}
    parsed = parse_config_args([node_config_text(2, 3, extra)])
    assert parsed == {"partition-id": 2, "num-partitions": 3, **extra}
    assert NodePolicy.from_node_config(parsed) == NodePolicy(max_epsilon=1.5, secret_noise_only=True)


class FakeRun:
    """What ``LocalFederation.flwr_run`` returns, for a run that ends at once (no processes);
    ``then`` runs first (what the ServerApp would have written)."""

    def __init__(self, then=None):
        self.then = then

    def wait(self) -> int:
        if self.then:
            self.then()
        return 0


@pytest.fixture
def no_processes(tmp_path, monkeypatch):
    """``deploy local`` without Flower processes: the federation "starts" (recording where
    its keys are and their folder's mode) and the run ends at once; keys default to a
    private folder under ``tmp_path/home``. Yields the record."""
    import fedlora.deploy as deploy

    seen = {"then": None}
    monkeypatch.setattr(deploy, "SECRETS_HOME", tmp_path / "home" / ".fedlora" / "deploy")

    def start(self, isolation):
        folder = self.certs["ca"].parent
        seen.update(folder=folder, mode=oct(folder.stat().st_mode & 0o777),
                    files=sorted(p.name for p in folder.iterdir()), work=self.work)

    monkeypatch.setattr(deploy.LocalFederation, "start", start)
    monkeypatch.setattr(deploy.LocalFederation, "flwr_run", lambda self, _: FakeRun(seen["then"]))
    return seen


def _private_key_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_deploy_keeps_its_keys_out_of_the_results_folder(tmp_path, no_processes, capsys):
    # Execute
    out = tmp_path / "out"
    code = main(["local", "nodes=2", "strategy=fedavg", f"out={out}"])
    # Assert: while it ran, the keys were in a fresh 0700 folder under ~/.fedlora/deploy,
    # named in the first line; none is in the results folder; the folder is gone after
    seen = no_processes
    assert code == 1  # the fake run wrote no summary
    assert seen["folder"].parent == tmp_path / "home" / ".fedlora" / "deploy" and seen["mode"] == "0o700"
    assert {"ca.key", "server.key", "node_0", "node_1"} <= set(seen["files"])
    assert seen["work"] == out / "deploy" and _private_key_files(out) == []
    assert f"keys in {seen['folder']} (deleted after the run)" in capsys.readouterr().out
    assert not seen["folder"].exists()


def test_deploy_refuses_a_secrets_folder_inside_the_results(tmp_path, no_processes, capsys):
    # Execute / Assert: one line, nothing written
    out = tmp_path / "out"
    assert main(["local", "nodes=2", f"out={out}", f"secrets={out / 'keys'}"]) == 2
    assert capsys.readouterr().err == (
        f"error: secrets={out / 'keys'} is inside the results folder out={out}, which users "
        f"share; choose a folder outside it (default: a fresh one in "
        f"{tmp_path / 'home' / '.fedlora' / 'deploy'}, deleted after the run)\n")
    assert not (out / "keys").exists() and not (out / "deploy").exists()


def test_deploy_keeps_a_secrets_folder_it_was_given(tmp_path, no_processes):
    # Execute
    keys = tmp_path / "keys"
    main(["local", "nodes=2", f"out={tmp_path / 'out'}", f"secrets={keys}"])
    # Assert
    assert no_processes["folder"] == keys and no_processes["mode"] == "0o700"
    assert {p.name for p in _private_key_files(keys)} == {"ca.key", "server.key", "node_0", "node_1"}


def test_a_run_the_serverapp_stopped_is_one_line_from_the_launcher(tmp_path, no_processes, capsys):
    # Prepare: the ServerApp stops on a node's refusal and leaves its line in error.txt
    from fedlora.report.results import RUN_ERROR

    out = tmp_path / "out"
    line = ("1 of 2 nodes refuse the run: node policy dp-max-epsilon=1 refuses dp.epsilon=3; "
            "set dp.epsilon <= 1 (partition 1)")
    no_processes["then"] = lambda: (out / RUN_ERROR).write_text(line + "\n")
    # Execute
    code = main(["local", "nodes=2", "dp.epsilon=3", f"out={out}"])
    # Assert: exit 2 and that line alone on stderr
    assert code == 2 and capsys.readouterr().err == f"error: {line}\n"


def test_the_multi_machine_recipe_keeps_the_control_api_on_loopback():
    """docs/deployment.md's SuperLink command leaves the Control API on 127.0.0.1 (Flower 1.39
    authenticates no user there: whoever reaches it can submit runs and register node keys)
    and its CLI connection is a loopback address."""
    import shlex

    text = (REPO / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL)
    superlinks = [shlex.split(line) for language, block in blocks if language == "bash"
                  for line in block.replace("\\\n", " ").splitlines()
                  if line.strip().startswith("flower-superlink")]
    connections = [tomllib.loads(block) for language, block in blocks
                   if language == "toml" and "[superlink." in block]
    assert superlinks and connections
    for argv in superlinks:
        hosts = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--host"]
        assert set(hosts) <= {"127.0.0.1", "localhost"}, argv
    for connection in connections:
        for federation in connection["superlink"].values():
            assert federation["address"].rpartition(":")[0] in ("127.0.0.1", "localhost")


def test_pyproject_run_config_lists_every_simulate_key():
    """``flwr run --run-config`` can only set keys the app declares: all of simulate's."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    _, raw = resolve_config([], nodes=100)
    assert set(flat_run_config(declared)) == set(flat_run_config({k: v if v is not None else ""
                                                                  for k, v in _flatten_none(raw).items()}))
    # Its defaults are simulate's defaults ("" is null)
    cfg, _ = config_from_run_config(flat_run_config(declared))
    expected, _ = resolve_config([], nodes=100)
    assert cfg == expected


def _flatten_none(raw: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flatten_none(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def test_run_config_file_reaches_the_server_as_the_same_config(tmp_path):
    # Prepare: what the launcher writes for `flwr run --run-config FILE`
    cfg, raw = resolve_config(["strategy=fedavg", "partition=dirichlet", "partition.alpha=0.3",
                               "targets=[query,value]", "rounds=3", "data.text_field=sentence"], 4)
    path = tmp_path / "run.toml"
    path.write_text(toml_lines(flat_run_config({**raw, "out": "/abs/out"})))
    # Execute: Flower parses the TOML and hands the app flattened dotted keys
    from flwr.common.config import flatten_dict

    received, out = config_from_run_config(flatten_dict(tomllib.loads(path.read_text())))
    # Assert
    assert received == cfg and out == Path("/abs/out")
    assert received.partition.name == "dirichlet" and received.partition.alpha == 0.3
    assert received.targets == ("query", "value") and received.clients == 4


# -- real processes ----------------------------------------------------------------------------


def _wait_exit(process: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _wait_for_line(log: Path, text: str, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return True
        time.sleep(0.3)
    return False


@pytest.mark.slow  # a real SuperLink and SuperNodes
def test_unregistered_or_plaintext_supernodes_are_refused(tmp_path):
    """Only registered keys over TLS get in: an unregistered key and a node without TLS exit
    non-zero; the registered node on TLS is activated (the control)."""
    logs = tmp_path / "deploy"
    federation = LocalFederation(logs, nodes=3, secrets=tmp_path / "secrets")
    try:
        federation.start_superlink()
        federation.register(federation.certs["nodes"][0])  # node 1's key is never registered
        # Execute
        unregistered = federation.start_node(1, isolation="subprocess", max_retries=1)
        plaintext = federation.start_node(2, isolation="subprocess", tls=False, max_retries=1,
                                          key=federation.certs["nodes"][0])
        admitted = federation.start_node(0, isolation="subprocess")
        # Assert
        assert _wait_exit(unregistered, 90) not in (None, 0)
        assert "Failed to activate SuperNode" in (logs / "supernode_1.log").read_text()
        assert _wait_for_line(logs / "superlink.log", "No SuperNode found with the given public key", 10)
        assert _wait_exit(plaintext, 90) not in (None, 0)
        assert _wait_for_line(logs / "superlink.log", "[Fleet.ActivateNode] Activated node_id=", 30)
        activated = (logs / "superlink.log").read_text().count("[Fleet.ActivateNode] Activated")
        assert activated == 1 and admitted.poll() is None
    finally:
        federation.processes.stop_all()
    assert all(p.poll() is not None for p in federation.processes.started.values())


def _alive(marker: str) -> list[str]:
    """Command lines of running processes that mention ``marker`` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "stat").read_text().split(") ")[1][0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow  # a real deployment: SuperLink, 2 SuperNodes, flwr run
def test_loopback_deployment_with_tls_and_authentication(tmp_path, monkeypatch):
    """``python -m fedlora.deploy local``: 2 authenticated SuperNodes over TLS train fedavg for
    1 round; the run directory holds a simulation's files; every process is gone after.
    About 2.5 min on 2 cores under a load average of 25 (mostly start-up and model builds)."""
    # Execute
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "fedlora.deploy", "local", "nodes=2", "strategy=fedavg",
                           "rounds=1", "clients_per_round=2", "local_steps=2", "max_length=16",
                           "tracking=mlflow", f"out={tmp_path}"], capture_output=True, text=True,
                          timeout=600, env=env)
    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SuperLink (TLS, node authentication)" in done.stdout and "final accuracy" in done.stdout
    for name in ("results.jsonl", "summary.json", "config.yaml", "partitions.json",
                 "participation.csv", "run.log"):
        assert (tmp_path / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["clients_trained"] for r in rows] == [0, 2]
    assert all(r["clients_failed"] == 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[1]["bytes_up"] == 2 * (12 * 8 * (384 + 384) + 384 * 21 + 21) * 4  # FedIT, r = 8
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["clients"] == 2 and summary["versions"]["flwr"] == "1.39.0"
    # Each node's warm ClientApp host built the model once and served both its messages
    assert len(summary["client_processes"]) == 2 and set(summary["client_processes"].values()) == {1}
    partitions = json.loads((tmp_path / "partitions.json").read_text())
    assert [p["partition_id"] for p in partitions] == [0, 1]
    assert sum(p["num_examples"] for p in partitions) == 1496
    log = (tmp_path / "deploy" / "superlink.log").read_text()
    assert log.count("[Fleet.ActivateNode] Activated") == 2
    assert _alive(str(tmp_path)) == []
    assert _private_key_files(tmp_path) == []  # the keys were elsewhere, and are gone
    # tracking=mlflow: the deployed ServerApp logged each row to the run directory's file store
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to read it
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    tracked = mlflow.get_run(json.loads((tmp_path / "tracking.json").read_text())["mlflow"])
    assert tracked.info.status == "FINISHED" and tracked.data.params["strategy"] == "fedavg"
    assert tracked.data.metrics["accuracy"] == rows[-1]["accuracy"]
    assert tracked.data.metrics["bytes_up"] == rows[-1]["bytes_up"]


@pytest.mark.slow  # a real deployment: SuperLink, 2 SuperNodes, flwr run
def test_a_node_whose_policy_caps_epsilon_refuses_the_run_with_one_line(tmp_path):
    """Node 1 spends at most epsilon 1; a run at dp.epsilon=3 ends before any training with
    the node's reason on one line (exit 2), no traceback, and every process gone."""
    # Execute
    done = subprocess.run([sys.executable, "-m", "fedlora.deploy", "local", "nodes=2",
                           "strategy=fedavg", "rounds=1", "local_steps=2", "max_length=16",
                           "dp.epsilon=3", "node_config.1=dp-max-epsilon=1", f"out={tmp_path}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Assert
    line = ("error: 1 of 2 nodes refuse the run: node policy dp-max-epsilon=1 refuses "
            "dp.epsilon=3; set dp.epsilon <= 1 (partition 1)")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == line
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "results.jsonl").is_file() or not (tmp_path / "results.jsonl").read_text()
    assert (tmp_path / "run.log").read_text().count("refuse the run") == 1
    assert _alive(str(tmp_path)) == []


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path):
    # Prepare
    launcher = subprocess.Popen([sys.executable, "-m", "fedlora.deploy", "local", "nodes=2",
                                 "strategy=fedavg", "rounds=50", "max_length=16", f"out={tmp_path}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_line(tmp_path / "results.jsonl", '"round": 1', 400)
    assert len(_alive(str(tmp_path))) >= 5  # SuperLink, 2 SuperNodes, 2 hosts, the run
    # Execute
    launcher.send_signal(2)  # SIGINT, as Ctrl-C
    sent = time.time()
    _, err = launcher.communicate(timeout=60)
    # Assert: within seconds, one line naming the checkpoint and the command that resumes
    import torch

    assert time.time() - sent < 15
    assert launcher.returncode == 130 and "Traceback" not in err
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["round"]
    assert sum("stopped" in line for line in err.splitlines()) == 1
    assert err.strip().splitlines()[-1] == (
        f"stopped after round {last} (checkpoint {tmp_path}/checkpoint.pt); resume with: "
        f"python -m fedlora.deploy local nodes=2 resume={tmp_path}")
    assert _alive(str(tmp_path)) == []


def _deploy(*keys: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.deploy", "local", "nodes=2", *keys]


def test_resume_refuses_a_changed_config_before_any_process_starts(tmp_path, capsys):
    # Prepare: a run directory as a killed run leaves it (config.yaml and checkpoint.pt)
    cfg, _ = resolve_config(["strategy=fedsb", "rounds=3"], nodes=2)
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    import torch

    torch.save({}, tmp_path / "checkpoint.pt")  # a whole file: resume refuses a damaged one
    # Execute / Assert: a different node count or key is one line, exit 2, nothing started
    assert main(["local", "nodes=3", f"resume={tmp_path}"]) == 2
    assert main(["local", "nodes=2", "rounds=5", f"resume={tmp_path}"]) == 2
    assert main(["local", "nodes=2", f"resume={tmp_path / 'nothing'}"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["error: resume: nodes=3 differs from the run's 2 clients; set nodes=2",
                     "error: resume: rounds=5 differs from the run's rounds=3; a resumed run keeps "
                     "its config (drop rounds= or set it to 3)",
                     f"error: resume={tmp_path / 'nothing'} has no checkpoint.pt and config.yaml; give "
                     "the directory of a run that wrote a checkpoint"]
    assert not (tmp_path / "deploy-resume-1").exists()


@pytest.mark.slow
def test_a_killed_deployment_resumes_to_the_uninterrupted_result(tmp_path):
    """Stop the whole federation (server included) after round 1 of 3, start a fresh one with
    ``resume=DIR``: new SuperNodes (new node ids, no node state) get their Fed-SB B and A back,
    and the results and final adapter equal an uninterrupted deployment's bit for bit.
    About 4 min on 2 cores (three deployments)."""
    import torch

    keys = ("strategy=fedsb", "rounds=3", "clients_per_round=2", "local_steps=2", "max_length=16")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    launcher = subprocess.Popen(_deploy(*keys, f"out={killed}"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert _wait_for_line(killed / "results.jsonl", '"round": 1', 400)
    deadline = time.time() + 60  # the round-1 checkpoint is written right after the row
    while time.time() < deadline and not (
            (killed / "checkpoint.pt").is_file()
            and torch.load(killed / "checkpoint.pt", weights_only=False)["round"] >= 1):
        time.sleep(0.5)
    launcher.send_signal(2)
    launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and _alive(str(killed)) == []
    # Execute
    resumed = subprocess.run(_deploy(f"resume={killed}"), capture_output=True, text=True, timeout=600)
    uninterrupted = subprocess.run(_deploy(*keys, f"out={whole}"), capture_output=True, text=True,
                                   timeout=600)
    # Assert
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                for line in (run / "results.jsonl").read_text().splitlines()]

    assert [r["round"] for r in rows(killed)] == [0, 1, 2, 3] and rows(killed) == rows(whole)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_after_rounds"] == [1] and summary["recovery_bytes_down"] > 0
    final = torch.load(killed / "final_adapter.pt")["adapter"]
    expected = torch.load(whole / "final_adapter.pt")["adapter"]
    assert set(final) == set(expected) and all(torch.equal(final[k], expected[k]) for k in final)
    assert (killed / "deploy" / "superlink.log").is_file()  # the killed run's logs are kept
    assert (killed / "deploy-resume-1" / "superlink.log").is_file()
    assert _alive(str(tmp_path)) == []


@pytest.mark.slow
def test_a_restarted_supernode_rejoins_and_gets_back_its_state(tmp_path):
    """A SuperNode stopped after round 1 and started again after round 2 rejoins under the
    same node id (node authentication) with an empty Context.state: its first reply says so
    and fails, its next message restores Fed-SB's B and A, and the last round trains all 3.
    About 3 min on 2 cores."""
    from fedlora.report.comm import STATE_LOST

    out = tmp_path / "run"
    federation = LocalFederation(out / "deploy", 3, secrets=tmp_path / "secrets")
    _, raw = resolve_config(["strategy=fedsb", "rounds=5", "clients_per_round=3", "local_steps=2",
                             "max_length=16"], 3)
    run_config = federation.work / "run_config.toml"
    run_config.write_text(toml_lines(flat_run_config({**raw, "clients": 3, "out": str(out)})))
    try:
        federation.start("warm")
        job = federation.flwr_run(run_config)
        assert _wait_for_line(out / "results.jsonl", '"round": 1', 400)
        federation.processes.stop(["clienthost_1", "supernode_1"])
        assert _wait_for_line(out / "results.jsonl", '"round": 2', 400)
        federation.start_node(1, "warm")
        assert _wait_exit(job, 600) == 0
    finally:
        federation.processes.stop_all()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[1]["clients_trained"] == 3 and rows[2]["clients_failed"] == 1
    assert rows[-1]["clients_trained"] == 3 and rows[-1]["clients_failed"] == 0
    assert STATE_LOST in (out / "run.log").read_text()
    assert json.loads((out / "summary.json").read_text())["recovery_bytes_down"] > 0
    log = (out / "deploy" / "superlink.log").read_text()
    activated = [line.split("node_id=")[1].strip() for line in log.splitlines() if "Activated node_id=" in line]
    assert len(activated) == 4 and len(set(activated)) == 3  # the same id came back
