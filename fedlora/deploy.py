"""``python -m fedlora.deploy``: the same ServerApp and ClientApp on real Flower SuperNodes.

  python -m fedlora.deploy certs DIR [nodes=N] [hosts=HOST,...]
      a local CA, a SuperLink certificate (SAN 127.0.0.1, localhost and ``hosts``) and N
      SuperNode key pairs (ECDSA P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``);
  python -m fedlora.deploy local nodes=N [node_isolation=warm|subprocess] [kill_node=I@R]
                                 [secrets=DIR] [node_config="k=v ..."] [node_config.I="k=v ..."]
                                 KEY=VALUE...
      one SuperLink (TLS, SuperNode authentication) and N SuperNodes on this machine, the run
      submitted with ``flwr run``; KEY=VALUE are ``python -m fedlora.simulate``'s keys and the
      results files are the same, in ``out=DIR`` (``clients`` is N).

What ``local`` does, in this order (every process logs to ``DIR/deploy/<name>.log``):
  1. validate the config and the node configs (one line and exit 2 on a bad value, before
     anything starts);
  2. write certificates and node keys to ``secrets=DIR`` (default: a fresh folder in
     ``~/.fedlora/deploy``, deleted after the run; never inside the results folder, which
     users share), a Flower CLI connection ``fedlora`` to ``DIR/deploy/flwr-home/config.toml``
     (``FLWR_HOME``) and the run config;
  3. start ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on free ports, its
     Control API on 127.0.0.1;
  4. register each node's public key (``flwr supernode register``): only those can join;
  5. start N ``flower-supernode``s, node i with ``--node-config "partition-id=i
     num-partitions=N ..."``: its DP policy (``fedlora.clients.policy``; default
     ``dp-secret-noise-only=true``), then ``node_config``'s keys, then ``node_config.i``'s;
     with ``node_isolation=warm`` (the default) each also gets a long-lived ClientApp host
     (``fedlora.run.clienthost``) that keeps the base model between messages;
  6. ``flwr run`` the app in this repository against that SuperLink and wait for it; a run a
     node's policy refuses ends with that one line (exit 2);
  7. stop every process it started (each is a session leader: its whole group), also on
     failure, Ctrl-C or SIGTERM. After Ctrl-C or SIGTERM it prints one line, the last
     checkpoint's round and the ``resume=`` command (``fedlora.run.stop.stop_line``), and exits
     with code 130; a second Ctrl-C while the processes stop kills them at once.
``kill_node=I@R`` (a failure drill) stops SuperNode I when training round R starts.
``resume=DIR`` continues a killed run from ``DIR/checkpoint.pt`` on a fresh federation (the
run's own config; logs in ``DIR/deploy-resume-<k>``).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from fedlora.config import RunConfig, check_deployment
from fedlora.core.errors import ConfigError
from fedlora.core.settings import POSITIVE, parse_section, run_config_values, setting

REPO = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml's [tool.flwr.app]
BIN = Path(sys.executable).parent  # flwr's console scripts of this environment
FEDERATION = "fedlora"
NODE_ISOLATIONS = ("warm", "subprocess")


@dataclass(frozen=True)
class LocalOptions:
    """``local``'s own keys, read as every other key is (``fedlora.core.settings``)."""

    nodes: int | None = setting(None, "SuperNodes to start (required): the run's clients",
                                check=POSITIVE)
    node_isolation: str = setting("warm", "warm: a long-lived ClientApp host per node | "
                                  "subprocess: Flower's process per message",
                                  choices=NODE_ISOLATIONS)
    kill_node: str | None = setting(None, "NODE@ROUND: stop SuperNode NODE when round ROUND "
                                    "starts (a failure drill)")
    secrets: str | None = setting(None, "folder for the CA and node keys, outside out (default: "
                                  "a fresh 0700 folder in ~/.fedlora/deploy, deleted at the end)")


@dataclass(frozen=True)
class CertsOptions:
    """``certs``' keys."""

    nodes: int = setting(2, "SuperNode key pairs to write", check=POSITIVE)
    hosts: str = setting("", "the SuperLink's other addresses (comma-separated) for its "
                         "certificate")


DEPLOY_KEYS = tuple(f.name for f in fields(LocalOptions))
NODE_CONFIG = "node_config"  # node_config="k=v ..." (every node), node_config.I="k=v ..." (node I)
# What every SuperNode this launcher starts holds unless node_config says otherwise: its DP
# noise is its own secret, whatever a run asks (fedlora.clients.policy).
DEFAULT_NODE_CONFIG = {"dp-secret-noise-only": True}
SECRETS_HOME = Path.home() / ".fedlora" / "deploy"  # default: a fresh private folder per run
STOP_GRACE_S = 5.0  # Ctrl-C: how long the processes get to stop (the ServerApp closes its files)


# -- certificates and keys ---------------------------------------------------------------------


def write_certificates(directory: Path, nodes: int, hosts: tuple[str, ...] = ()) -> dict:
    """A CA (``ca.crt``), the SuperLink's certificate and key (``server.crt``, ``server.key``,
    SAN IP 127.0.0.1, DNS localhost and each of ``hosts``) and ``node_<i>``/``node_<i>.pub``
    OpenSSH ECDSA P-384 key pairs for SuperNode authentication. For a try-out: a real
    federation's CA key stays off the SuperLink machine."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    private_folder(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=365)}

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora try-out CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA384()))
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.DNSName("localhost")]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora superlink")]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    files = {"ca": directory / "ca.crt", "server_cert": directory / "server.crt",
             "server_key": directory / "server.key"}
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files["server_cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(files["server_key"], pem_key(server_key))
    write_private(directory / "ca.key", pem_key(ca_key))
    files["nodes"] = [write_node_key(directory / f"node_{i}") for i in range(nodes)]
    return files


def private_folder(directory: Path) -> Path:
    """``directory`` (and missing parents) readable by its owner only (0700), even if it
    existed: it holds private keys."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    return directory


def write_private(path: Path, data: bytes) -> None:
    """A private key file, created with mode 0600 (never readable by others, not even for the
    moment between writing and a chmod); an existing file is truncated and made 0600."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(data)


def write_node_key(path: Path) -> Path:
    """One SuperNode's key pair: ``path`` (private) and ``path.pub`` (what the SuperLink
    registers), ECDSA P-384 in OpenSSH format. Returns ``path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    path.with_name(path.name + ".pub").write_bytes(public + f" {path.name}\n".encode())
    return path


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with code {process.returncode}; see {log}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{log.stem} did not open port {port} in {timeout_s:.0f} s; see {log}")


class Processes:
    """The processes this launcher started, each in its own session, so that stopping one
    stops its children too (a SuperNode's ClientApp processes, the SuperLink's ServerApp)."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir = log_dir
        self.env = env
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   cwd=REPO, start_new_session=True)
        log.close()
        self.started[name] = process
        return process

    def stop(self, names: list[str], grace_s: float = 10.0) -> None:
        """SIGTERM to each named process group and to its leader's descendants that left the
        group (the SuperLink starts the ServerApp in a session of its own), SIGKILL to what is
        left after ``grace_s``. psutil (a peft dependency) checks that a pid is still the same
        process before signalling it."""
        import psutil

        chosen = [self.started[name] for name in names]
        strays = []
        for process in chosen:
            try:
                strays += psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for process in chosen:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
        for stray in strays:
            try:
                stray.terminate()
            except psutil.NoSuchProcess:
                pass
        deadline = time.time() + grace_s
        for process in chosen:
            try:
                process.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(strays, timeout=max(0.0, deadline - time.time()))
        for stray in alive:
            try:
                stray.kill()
            except psutil.NoSuchProcess:
                pass
        for process in chosen:
            _signal_group(process.pid, signal.SIGKILL)  # children that outlived their leader
            process.wait()

    def stop_all(self, grace_s: float = 10.0) -> None:
        self.stop(list(self.started), grace_s)

    def kill_all(self) -> None:
        """SIGKILL to every process group and its leader's descendants, without waiting (a
        second Ctrl-C)."""
        import psutil

        for process in self.started.values():
            try:
                strays = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                strays = []
            for stray in strays:
                try:
                    stray.kill()
                except psutil.NoSuchProcess:
                    pass
            _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # the group id of a session leader is its pid
    except ProcessLookupError:
        pass


# -- the run -----------------------------------------------------------------------------------


def flat_run_config(raw: dict) -> dict:
    """Flower's run config for ``fedlora.run.server:app``: dotted keys (Flower's flatten_dict),
    null as "" (the app's default for every key), lists as comma-separated strings."""
    from flwr.common.config import flatten_dict

    return flatten_dict(run_config_values(raw))


def toml_lines(flat: dict) -> str:
    """``key = value`` lines; json's scalars are valid TOML (strings, numbers, true/false)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in flat.items())


def check_declared(flat: dict) -> None:
    """Every run-config key must be declared in pyproject.toml's ``[tool.flwr.app.config]``:
    Flower's SuperLink refuses a run whose ``--run-config`` has another key ("Key ... is not
    present in the main dictionary", ``flwr run`` exit code 1), and only once the federation is
    up. Checked here, before anything starts."""
    import tomllib

    from flwr.common.config import flatten_dict

    with (REPO / "pyproject.toml").open("rb") as f:
        declared = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"].get("config", {}))
    undeclared = sorted(set(flat) - set(declared))
    if undeclared:
        raise ConfigError(f"'{undeclared[0]}' is not declared in {REPO / 'pyproject.toml'} "
                          "[tool.flwr.app.config], so flwr run would refuse the run; declare it "
                          "there with its default (\"\" for null)")


def parse_deploy_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Split ``nodes=``, ``node_isolation=``, ``kill_node=``, ``secrets=`` and
    ``node_config[.I]=`` off the simulate keys."""
    options, overrides, node_config = {}, [], {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in DEPLOY_KEYS:
            options[key] = value
        elif key == NODE_CONFIG or key.startswith(NODE_CONFIG + "."):
            node_config[key] = value
        else:
            overrides.append(arg)
    given = parse_section(LocalOptions, options)
    if given.nodes is None:
        raise ConfigError("nodes is required: the number of SuperNodes to start, e.g. nodes=4")
    nodes, isolation = given.nodes, given.node_isolation
    kill = None
    if given.kill_node is not None:
        index, _, round_ = given.kill_node.partition("@")
        if not (index.isdigit() and round_.isdigit() and int(index) < nodes and int(round_) >= 1):
            raise ConfigError(f"kill_node={given.kill_node} must be NODE@ROUND with "
                              f"0 <= NODE < {nodes} and ROUND >= 1, e.g. kill_node=1@2")
        kill = (int(index), int(round_))
    clients = [o for o in overrides if o.startswith("clients=")]
    if clients and clients[-1] != f"clients={nodes}":
        raise ConfigError(f"{clients[-1]} differs from nodes={nodes}: in deployment every "
                          f"client is one SuperNode; drop clients= or set it to {nodes}")
    secrets = Path(given.secrets).expanduser().resolve() if given.secrets else None
    return {"nodes": nodes, "isolation": isolation, "kill": kill, "secrets": secrets,
            "node_configs": node_configs(node_config, nodes)}, overrides


def node_configs(given: dict[str, str], nodes: int) -> list[dict]:
    """Each SuperNode's own node config besides its partition: ``DEFAULT_NODE_CONFIG``, then
    ``node_config`` (every node), then ``node_config.I`` (node I), later keys winning. Each
    value is parsed as Flower parses ``--node-config`` and its DP policy checked
    (``fedlora.clients.policy``), so a typo is one line before anything starts."""
    from fedlora.clients.policy import NodePolicy, PolicyError

    parsed = {}
    for key, text in given.items():
        index = key[len(NODE_CONFIG) + 1:]
        if key != NODE_CONFIG and not (index.isdigit() and int(index) < nodes):
            raise ConfigError(f"{key} names no node: use {NODE_CONFIG}=\"...\" for every node or "
                              f"{NODE_CONFIG}.I=\"...\" with 0 <= I < {nodes}")
        values = _parse_node_config(key, text)
        reserved = sorted({"partition-id", "num-partitions"} & set(values))
        if reserved:
            raise ConfigError(f"{key} sets {reserved[0]}, which deploy sets itself (node I holds "
                              f"partition I of nodes={nodes}); drop it")
        try:
            NodePolicy.from_node_config(values)
        except PolicyError as error:
            raise ConfigError(f"{key}: {error}") from None
        parsed[key] = values
    return [{**DEFAULT_NODE_CONFIG, **parsed.get(NODE_CONFIG, {}),
             **parsed.get(f"{NODE_CONFIG}.{index}", {})} for index in range(nodes)]


def _parse_node_config(key: str, text: str) -> dict:
    import click
    from flwr.common.config import parse_config_args

    try:
        values = parse_config_args([text])
    except click.ClickException:
        values = {}
    if not values:
        raise ConfigError(f"{key}={text!r} is not a list of key=value pairs (values: true, "
                          "false, numbers or \"quoted strings\"); write e.g. "
                          f"{key}=\"dp-required=true dp-max-epsilon=8\"")
    return values


def node_config_text(partition_id: int, partitions: int, extra: dict) -> str:
    """A SuperNode's ``--node-config`` string (TOML values, as Flower parses them)."""
    pairs = {"partition-id": partition_id, "num-partitions": partitions, **extra}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in pairs.items())


def resolve_config(overrides: list[str], nodes: int) -> tuple[RunConfig, dict]:
    """The validated RunConfig and the resolved nested dict, from simulate's Hydra config."""
    from fedlora.run.cli import check_paths, compose_config

    overrides = [o for o in overrides if not o.startswith("clients=")] + [f"clients={nodes}"]
    check_paths(overrides)
    raw = compose_config(overrides)
    cfg = RunConfig.from_dict(raw)
    check_deployment(cfg)  # a real SuperNode is one client: no hosting, no client batches
    return cfg, raw


def resumed_deployment(overrides: list[str], nodes: int, cfg: RunConfig, raw: dict) -> tuple[RunConfig, dict]:
    """``resume=DIR``: the killed run's config (checked as ``python -m fedlora.simulate
    resume=DIR`` checks it) and a run config that continues it in DIR. The new SuperNodes get
    the same partitions (``partition-id=i``); the ServerApp restores what they lost."""
    from fedlora.run.cli import resumed_config

    run_dir = Path(raw["resume"]).resolve()
    given = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    saved = resumed_config(run_dir, cfg, [key for key in given if key != "clients"])
    if saved.clients != nodes:
        raise ConfigError(f"resume: nodes={nodes} differs from the run's {saved.clients} clients; "
                          f"set nodes={saved.clients}")
    return saved, {**raw, "resume": str(run_dir), "out": str(run_dir)}


class LocalFederation:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes, on this machine.

    ``work`` receives the Flower CLI home (``flwr-home/``, whose connection ``fedlora`` points
    at this SuperLink's Control API) and one log per process; ``secrets`` (a folder of its
    own, 0700, never inside a results folder a user shares) the CA, the SuperLink's key and
    the node keys. ``node_configs[i]``: node i's node config besides its partition (its DP
    policy, ``fedlora.clients.policy``; default ``DEFAULT_NODE_CONFIG``)."""

    def __init__(self, work: Path, nodes: int, secrets: Path,
                 node_configs: list[dict] | None = None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.node_configs = node_configs or [dict(DEFAULT_NODE_CONFIG) for _ in range(nodes)]
        self.certs = write_certificates(secrets, nodes)
        self.fleet_port, self.api_port = free_port(), free_port()
        flwr_home = work / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.api_port}"\nroot-certificates = "{self.certs["ca"]}"\n')
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                    # The ServerApp and N ClientApps share this machine's cores: one OpenMP
                    # thread each (more made the server's evaluation 3x slower on 2 cores).
                    "OMP_NUM_THREADS": "1"}
        self.processes = Processes(work, self.env)

    def start_superlink(self) -> None:
        certs = self.certs
        superlink = self.processes.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]),
            "--ssl-certfile", str(certs["server_cert"]), "--ssl-keyfile", str(certs["server_key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--fleet-api-address", f"127.0.0.1:{self.fleet_port}", "--host", "127.0.0.1",
            "--port", str(self.api_port)])
        wait_for_port(self.fleet_port, superlink, self.work / "superlink.log")
        wait_for_port(self.api_port, superlink, self.work / "superlink.log")

    def register(self, *keys: Path) -> None:
        """Admit the SuperNodes holding ``keys`` (their public keys ``<key>.pub``)."""
        registrations = [subprocess.Popen([str(BIN / "flwr"), "supernode", "register", f"{key}.pub",
                                           FEDERATION], env=self.env, cwd=REPO, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                         for key in keys]
        for key, registration in zip(keys, registrations):
            output, _ = registration.communicate(timeout=120)
            if registration.returncode != 0:
                raise RuntimeError(f"registering {key.name}.pub failed: {output[-2000:]}")

    def start_node(self, index: int, isolation: str = "warm", key: Path | None = None,
                   tls: bool = True, max_retries: int = 10) -> subprocess.Popen:
        """SuperNode ``index`` (partition ``index`` of ``nodes``), authenticated with ``key``
        (default: its own key in ``secrets``) and, with ``warm`` isolation, the ClientApp host
        (``fedlora.run.clienthost``) that serves its messages."""
        runtime_port = free_port()
        key = key or self.certs["nodes"][index]
        argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.fleet_port}",
                *(["--root-certificates", str(self.certs["ca"])] if tls else ["--insecure"]),
                "--auth-supernode-private-key", str(key),
                "--node-config", node_config_text(index, self.nodes, self.node_configs[index]),
                "--port", str(runtime_port), "--max-retries", str(max_retries)]
        if isolation == "warm":
            argv += ["--isolation", "process"]
        node = self.processes.start(f"supernode_{index}", argv)
        if isolation == "warm":
            wait_for_port(runtime_port, node, self.work / f"supernode_{index}.log")
            self.processes.start(f"clienthost_{index}", [
                sys.executable, "-m", "fedlora.run.clienthost",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}"])
        return node

    def start(self, isolation: str) -> None:
        """The SuperLink, every node's key registered, and all SuperNodes."""
        self.start_superlink()
        self.register(*self.certs["nodes"])
        for index in range(self.nodes):
            self.start_node(index, isolation)

    def flwr_run(self, run_config: Path) -> subprocess.Popen:
        """Submit the app in this repository to the SuperLink and stream its logs."""
        job = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), FEDERATION, "--stream",
                                "--run-config", str(run_config)], env=self.env, cwd=REPO,
                               start_new_session=True)
        self.processes.started["flwr-run"] = job
        return job


def deploy_local(options: dict, cfg: RunConfig, raw: dict) -> int:
    """Start the federation, run the job, stop everything; return the exit code."""
    nodes, isolation = options["nodes"], options["isolation"]
    out = Path(raw.get("out") or f"outputs/{time.strftime('%Y-%m-%d_%H-%M-%S')}-{cfg.strategy}-deploy")
    out = out.resolve()  # the ServerApp process has another working directory
    work = out / "deploy"
    if raw.get("resume"):  # a fresh log directory: the killed run's logs stay
        work = next(out / f"deploy-resume-{k}" for k in itertools.count(1)
                    if not (out / f"deploy-resume-{k}").exists())
    flat = flat_run_config({**raw, "clients": nodes, "out": str(out)})
    check_declared(flat)
    secrets = options.get("secrets")
    if secrets is not None and secrets.is_relative_to(out):
        raise ConfigError(f"secrets={secrets} is inside the results folder out={out}, which "
                          f"users share; choose a folder outside it (default: a fresh one in "
                          f"{SECRETS_HOME}, deleted after the run)")
    temporary = secrets is None  # the default: a fresh private folder, deleted at the end
    if temporary:
        secrets = Path(tempfile.mkdtemp(prefix=f"{out.name}-", dir=private_folder(SECRETS_HOME)))
    federation = LocalFederation(work, nodes, secrets, options.get("node_configs"))
    run_config = federation.work / "run_config.toml"
    run_config.write_text(toml_lines(flat))
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupted = False
    try:
        federation.start(isolation)
        if options["kill"] is not None:
            threading.Thread(target=kill_node_at_round, daemon=True,
                             args=(federation.processes, *options["kill"], out / "results.jsonl")).start()
        print(f"SuperLink (TLS, node authentication) on 127.0.0.1:{federation.fleet_port}, {nodes} "
              f"SuperNodes ({isolation}); logs in {federation.work}; keys in {secrets}"
              f"{' (deleted after the run)' if temporary else ''}", flush=True)
        started = time.time()
        code = federation.flwr_run(run_config).wait()
        summary_path = out / "summary.json"
        if not summary_path.is_file() or summary_path.stat().st_mtime < started:
            return run_failed(out, federation.work, code, started)
        summary = json.loads(summary_path.read_text())
        from fedlora.report.results import final_line

        print(f"{final_line(summary)}; results in {out}", flush=True)
        return 0
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the checkpoint on disk is where to go on
        interrupted = True
    finally:
        resume = resume_command(out, nodes, isolation)
        for sig in previous:  # a second Ctrl-C kills what is left at once
            signal.signal(sig, lambda signum, frame: _stop_at_once(federation.processes, out, resume,
                                                                   signum))
        federation.processes.stop_all(STOP_GRACE_S if interrupted else 10.0)
        if temporary:  # one run's CA and keys: no use once its processes are gone
            shutil.rmtree(secrets, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from fedlora.run.stop import stop_line

    print(stop_line(out, resume), file=sys.stderr, flush=True)
    return 130


def resume_command(out: Path, nodes: int, isolation: str) -> str:
    """The command that continues the run in ``out`` on a fresh local federation."""
    isolation = "" if isolation == "warm" else f" node_isolation={isolation}"
    return f"python -m fedlora.deploy local nodes={nodes}{isolation} resume={out}"


def _stop_at_once(processes: Processes, out: Path, resume: str, signum: int) -> None:
    """A second Ctrl-C while the processes stop: kill them, say where to go on, leave."""
    from fedlora.run.stop import stop_line

    processes.kill_all()
    print(stop_line(out, resume), file=sys.stderr, flush=True)
    os._exit(128 + signum)


def run_failed(out: Path, work: Path, code: int, started: float) -> int:
    """A run that wrote no summary: the ServerApp's one-line reason if it stopped on a config
    problem (``error.txt``, e.g. a node's DP policy refused the run; exit code 2), else where
    to look."""
    from fedlora.report.results import RUN_ERROR

    error = out / RUN_ERROR
    if error.is_file() and error.stat().st_mtime >= started:
        print(f"error: {error.read_text().strip()}", file=sys.stderr)
        return 2
    print(f"error: the run ended without a summary (flwr run exit code {code}); see "
          f"{work}/superlink.log and {out}/run.log", file=sys.stderr)
    return code or 1


def kill_node_at_round(processes: Processes, index: int, server_round: int, results: Path) -> None:
    """The failure drill: stop SuperNode ``index`` once the row of round ``server_round - 1``
    is written, i.e. while round ``server_round`` trains."""
    while True:
        rows = results.read_text().splitlines() if results.is_file() else []
        if any(json.loads(row)["round"] >= server_round - 1 for row in rows):
            break
        time.sleep(0.2)
    processes.stop([name for name in (f"clienthost_{index}", f"supernode_{index}")
                    if name in processes.started])
    print(f"kill_node: stopped SuperNode {index} at the start of round {server_round}", flush=True)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m fedlora.deploy certs DIR [nodes=N] [hosts=H1,H2]\n"
             "       python -m fedlora.deploy local nodes=N [node_isolation=warm|subprocess] "
             "[kill_node=I@R] [secrets=DIR] [node_config=\"k=v ...\"] [node_config.I=\"k=v ...\"] "
             "KEY=VALUE...")
    if not argv or argv[0] not in ("certs", "local"):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "certs":
            if len(argv) < 2 or "=" in argv[1]:
                raise ConfigError("certs needs a directory: python -m fedlora.deploy certs DIR nodes=N")
            given = parse_section(CertsOptions, dict(arg.partition("=")[::2] for arg in argv[2:]))
            nodes = given.nodes
            hosts = tuple(h for h in given.hosts.split(",") if h)
            files = write_certificates(Path(argv[1]), nodes, hosts)
            print(f"wrote {files['ca']}, {files['server_cert']}, {files['server_key']} and "
                  f"{nodes} node key pairs (node_<i>, node_<i>.pub) in {argv[1]}")
            return 0
        options, overrides = parse_deploy_args(argv[1:])
        cfg, raw = resolve_config(overrides, options["nodes"])
        if raw.get("resume"):
            cfg, raw = resumed_deployment(overrides, options["nodes"], cfg, raw)
        return deploy_local(options, cfg, raw)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before deploy_local started a process (it reports its own)
        print("interrupted before any process started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
