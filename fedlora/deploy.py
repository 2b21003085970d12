"""``python -m fedlora.deploy``: the same ServerApp and ClientApp on real Flower SuperNodes.

  python -m fedlora.deploy certs DIR [nodes=N] [hosts=HOST,...]
      a local CA, a SuperLink certificate (SAN 127.0.0.1, localhost and ``hosts``) and N
      SuperNode key pairs (ECDSA P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``);
  python -m fedlora.deploy local nodes=N [node_isolation=warm|subprocess] [kill_node=I@R] KEY=VALUE...
      one SuperLink (TLS, SuperNode authentication) and N SuperNodes on this machine, the run
      submitted with ``flwr run``; KEY=VALUE are ``python -m fedlora.simulate``'s keys and the
      results files are the same, in ``out=DIR`` (``clients`` is N).

What ``local`` does, in this order (every process logs to ``DIR/deploy/<name>.log``):
  1. validate the config (one line and exit 2 on a bad value, before anything starts);
  2. write certificates and node keys to ``DIR/deploy/certs``, a Flower CLI connection
     ``fedlora`` to ``DIR/deploy/flwr-home/config.toml`` (``FLWR_HOME``) and the run config;
  3. start ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on free ports;
  4. register each node's public key (``flwr supernode register``): only those can join;
  5. start N ``flower-supernode``s, node i with ``--node-config "partition-id=i num-partitions=N"``;
     with ``node_isolation=warm`` (the default) each also gets a long-lived ClientApp host
     (``fedlora.run.clienthost``) that keeps the base model between messages;
  6. ``flwr run`` the app in this repository against that SuperLink and wait for it;
  7. stop every process it started (each is a session leader: its whole group), also on
     Ctrl-C, SIGTERM or failure.
``kill_node=I@R`` (a failure drill) stops SuperNode I when training round R starts.
``resume=DIR`` continues a killed run from ``DIR/checkpoint.pt`` on a fresh federation (the
run's own config; logs in ``DIR/deploy-resume-<k>``).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml's [tool.flwr.app]
BIN = Path(sys.executable).parent  # flwr's console scripts of this environment
FEDERATION = "fedlora"
NODE_ISOLATIONS = ("warm", "subprocess")
DEPLOY_KEYS = ("nodes", "node_isolation", "kill_node")


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

    directory.mkdir(parents=True, exist_ok=True)
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
    files["server_key"].write_bytes(pem_key(server_key))
    (directory / "ca.key").write_bytes(pem_key(ca_key))
    files["nodes"] = [write_node_key(directory / f"node_{i}") for i in range(nodes)]
    for path in directory.iterdir():
        if not path.name.endswith((".crt", ".pub")):
            path.chmod(0o600)  # private keys
    return files


def write_node_key(path: Path) -> Path:
    """One SuperNode's key pair: ``path`` (private) and ``path.pub`` (what the SuperLink
    registers), ECDSA P-384 in OpenSSH format. Returns ``path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
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

    def stop_all(self) -> None:
        self.stop(list(self.started))


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # the group id of a session leader is its pid
    except ProcessLookupError:
        pass


# -- the run -----------------------------------------------------------------------------------


def flat_run_config(raw: dict, prefix: str = "") -> dict:
    """Flower's run config for ``fedlora.run.server:app``: dotted keys, no None (the app's default
    "" stands for null), lists as comma-separated strings."""
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(flat_run_config(value, prefix + key + "."))
        elif isinstance(value, (list, tuple)):
            flat[prefix + key] = ",".join(str(v) for v in value)
        elif value is not None:
            flat[prefix + key] = value
    return flat


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
    """Split ``nodes=``, ``node_isolation=``, ``kill_node=`` off the simulate keys."""
    options, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in DEPLOY_KEYS:
            options[key] = value
        else:
            overrides.append(arg)
    if "nodes" not in options:
        raise ConfigError("nodes is required: the number of SuperNodes to start, e.g. nodes=4")
    try:
        nodes = int(options["nodes"])
    except ValueError:
        nodes = 0
    if nodes < 1:
        raise ConfigError(f"nodes={options['nodes']} must be a positive integer; set nodes >= 1")
    isolation = options.get("node_isolation", "warm")
    if isolation not in NODE_ISOLATIONS:
        raise ConfigError(f"node_isolation '{isolation}' is unknown; choose one of: "
                          f"{', '.join(NODE_ISOLATIONS)}")
    kill = None
    if "kill_node" in options:
        index, _, round_ = options["kill_node"].partition("@")
        if not (index.isdigit() and round_.isdigit() and int(index) < nodes and int(round_) >= 1):
            raise ConfigError(f"kill_node={options['kill_node']} must be NODE@ROUND with "
                              f"0 <= NODE < {nodes} and ROUND >= 1, e.g. kill_node=1@2")
        kill = (int(index), int(round_))
    clients = [o for o in overrides if o.startswith("clients=")]
    if clients and clients[-1] != f"clients={nodes}":
        raise ConfigError(f"{clients[-1]} differs from nodes={nodes}: in deployment every "
                          f"client is one SuperNode; drop clients= or set it to {nodes}")
    return {"nodes": nodes, "isolation": isolation, "kill": kill}, overrides


def resolve_config(overrides: list[str], nodes: int) -> tuple[RunConfig, dict]:
    """The validated RunConfig and the resolved nested dict, from simulate's Hydra config."""
    from fedlora.run.cli import check_command_line, check_paths, compose_config

    overrides = [o for o in overrides if not o.startswith("clients=")] + [f"clients={nodes}"]
    check_command_line(overrides)
    check_paths(overrides)
    raw = compose_config(overrides)
    return RunConfig.from_dict(raw), raw


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

    ``work`` receives the certificates (``certs/``), the Flower CLI home (``flwr-home/``, whose
    connection ``fedlora`` points at this SuperLink's Control API) and one log per process."""

    def __init__(self, work: Path, nodes: int):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.certs = write_certificates(work / "certs", nodes)
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
        (default: ``certs/node_<index>``) and, with ``warm`` isolation, the ClientApp host
        (``fedlora.run.clienthost``) that serves its messages."""
        runtime_port = free_port()
        key = key or self.certs["nodes"][index]
        argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.fleet_port}",
                *(["--root-certificates", str(self.certs["ca"])] if tls else ["--insecure"]),
                "--auth-supernode-private-key", str(key),
                "--node-config", f"partition-id={index} num-partitions={self.nodes}",
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
    federation = LocalFederation(work, nodes)
    run_config = federation.work / "run_config.toml"
    run_config.write_text(toml_lines(flat))
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        federation.start(isolation)
        if options["kill"] is not None:
            threading.Thread(target=kill_node_at_round, daemon=True,
                             args=(federation.processes, *options["kill"], out / "results.jsonl")).start()
        print(f"SuperLink (TLS, node authentication) on 127.0.0.1:{federation.fleet_port}, {nodes} "
              f"SuperNodes ({isolation}); logs in {federation.work}", flush=True)
        started = time.time()
        code = federation.flwr_run(run_config).wait()
        summary_path = out / "summary.json"
        if not summary_path.is_file() or summary_path.stat().st_mtime < started:
            print(f"error: the run ended without a summary (flwr run exit code {code}); see "
                  f"{federation.work}/superlink.log and {out}/run.log", file=sys.stderr)
            return code or 1
        summary = json.loads(summary_path.read_text())
        from fedlora.report.results import final_line

        print(f"{final_line(summary)}; results in {out}", flush=True)
        return 0
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        federation.processes.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
             "[kill_node=I@R] KEY=VALUE...")
    if not argv or argv[0] not in ("certs", "local"):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "certs":
            if len(argv) < 2 or "=" in argv[1]:
                raise ConfigError("certs needs a directory: python -m fedlora.deploy certs DIR nodes=N")
            settings = dict(arg.partition("=")[::2] for arg in argv[2:])
            nodes = int(settings.get("nodes", 2))
            hosts = tuple(h for h in settings.get("hosts", "").split(",") if h)
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
    except KeyboardInterrupt:
        print("interrupted: stopped every process this launcher started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
