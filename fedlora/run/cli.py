"""What every fedlora command line shares: the Hydra config, key checks, logging, resume.

``python -m fedlora.simulate``, ``fedlora.deploy``, ``fedlora.sweep`` and the ServerApp import
these; nothing here imports them back. Hydra's config schema is a structured config generated
from the settings dataclasses (``fedlora.config.run_schema``) and the method registry, so a key,
its default, its type and its help live in one place, and Hydra itself refuses an unknown key
or a value of the wrong type; ``compose_config`` turns its multi-line errors into fedlora's one
line. ``fedlora/conf/`` holds only Hydra's own settings and the named presets
(``partition=dirichlet``, ``participation=markov``, ``dp=on``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from fedlora.run.checkpoint import check_checkpoint
from fedlora.config import RunConfig, hydra_tree, run_schema
from fedlora.core.errors import ConfigError
from fedlora.core.settings import config_error, run_config_values

CONF_DIR = Path(__file__).parents[1] / "conf"  # fedlora/conf
GENERATED_CONFIG = "fedlora_keys"  # the ConfigStore name config.yaml's defaults list includes


def fail(message: str) -> None:
    """A bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def register_hydra_config() -> None:
    """Put the structured config of every key (``run_schema``) where config.yaml's defaults list
    finds it, and the resolver the run directory's name uses."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=GENERATED_CONFIG, node=run_schema())
    # The run directory: resume's, else out, else a dated one (oc.select takes a null for set).
    OmegaConf.register_new_resolver(
        "first_set", lambda *values: next(v for v in values if v is not None), replace=True)


def compose_config(overrides: list[str]) -> dict:
    """The resolved nested config ``python -m fedlora.simulate <overrides>`` would run; what Hydra
    refuses (an unknown key or preset, a value of the wrong type) is a one-line ``ConfigError``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_hydra_config()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise hydra_error(error) from None


def hydra_error(error: Exception) -> ConfigError:
    """Hydra's multi-line complaint about the command line as one line naming the key, the bad
    value and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        options = preset_groups().get(group)
        if options:
            return ConfigError(f"{group} '{choice}' is unknown; choose one of: {', '.join(options)}")
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        return config_error(cause, run_schema())
    lines = [line.strip() for line in str(error).split("\nConfig search path")[0].splitlines()]
    return ConfigError(" ".join(line for line in lines if line))


def preset_groups() -> dict[str, list[str]]:
    """The named presets: ``{group: [option, ...]}`` from fedlora/conf's sub-folders."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir()}


def check_command_line(argv: list[str]) -> None:
    """Compose the config of ``argv``'s overrides as Hydra will, so that what it refuses is one
    line (``ConfigError``) before Hydra starts (whose own errors are multi-line). A sweep
    (``-m``, ``key=a,b``) composes once per value of each swept key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")
                 and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if not {"-m", "--multirun"} & set(argv):
        compose_config(overrides)
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise hydra_error(error) from None
    first = [o.input_line if not o.is_sweep_override() else
             f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    compose_config(first)
    for index, override in enumerate(parsed):
        if override.is_sweep_override():
            for value in list(override.sweep_string_iterator())[1:]:
                first_but_one = list(first)
                first_but_one[index] = f"{override.get_key_element()}={value}"
                compose_config(first_but_one)


def check_paths(argv: list[str]) -> None:
    """``out=`` must be a directory this process can create and write, ``resume=`` an existing
    directory (else ``ConfigError``): checked before Hydra, which creates the run directory (a
    traceback if it can't).
    A sweep (``-m``) writes under ``multirun/`` instead, so it is left to its runs."""
    import tempfile

    if {"-m", "--multirun"} & set(argv):
        return
    given = dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))
    resume, out = given.get("resume"), given.get("out")
    if resume not in (None, "", "null") and not Path(resume).expanduser().is_dir():
        raise ConfigError(f"resume={resume} has no checkpoint.pt and config.yaml; give the "
                          "directory of a run that wrote a checkpoint")
    if out in (None, "", "null") or "${" in out or resume not in (None, "", "null"):
        return
    try:
        Path(out).expanduser().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=Path(out).expanduser()):
            pass
    except OSError as error:
        raise ConfigError(f"out={out} cannot be created or written ({error.strerror}); give a "
                          "directory you can write, e.g. out=outputs/my-run") from error


def setup_logging(out: Path, quiet: bool) -> None:
    """fedlora's and Flower's log lines go to ``out/run.log``; the console gets warnings only
    (and the progress lines) unless ``verbose=true``."""
    out.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(out / "run.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("fedlora", "flwr"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(file_handler)
        for handler in logger.handlers:
            if handler is not file_handler and isinstance(handler, logging.StreamHandler):
                # Flower's console warnings (run_simulation's deprecation, skipped federated
                # evaluation) are expected here; they stay in run.log.
                handler.setLevel(logging.ERROR if quiet and name == "flwr" else
                                 logging.WARNING if quiet else logging.INFO)
    if not logging.getLogger("fedlora").handlers[:-1]:
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING if quiet else logging.INFO)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fedlora").addHandler(console)


def keys_markdown() -> str:
    """The table of every key, its default and its help, from the settings dataclasses
    (``python -m fedlora.run.cli keys``; docs/configuration.md holds its output)."""
    from dataclasses import fields

    from fedlora.config import SECTIONS, DataSpec, RunConfig
    from fedlora.core.registry import methods

    tree = hydra_tree()

    def rows(settings_class, prefix: str):
        for f in fields(settings_class):
            if "help" not in f.metadata:
                continue
            default = tree[f.name] if not prefix else f.default  # resolved top-level defaults
            default = list(default) if isinstance(default, tuple) else default
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) \
                else default
            yield f"| `{prefix}{f.name}` | `{shown}` | {f.metadata['help']} |"

    sections = {**SECTIONS, "data": DataSpec,
                **{name: m.settings for name, m in methods().items() if m.settings is not None}}
    lines = ["| key | default | meaning |", "|---|---|---|", *rows(RunConfig, "")]
    for name, settings_class in sections.items():
        lines += rows(settings_class, f"{name}.")
    lines += ["| `out` | `null` | the results directory; null: outputs/<date-time>-<strategy> |",
              "| `resume` | `null` | a run directory: continue its killed run from its checkpoint |"]
    return "\n".join(lines) + "\n\n" + task_defaults_markdown()


def task_defaults_markdown() -> str:
    """What the keys left null take for each task (its class attributes, ``fedlora.tasks``)."""
    from fedlora.tasks import tasks

    sized = ["rounds", "local_steps", "batch_size", "eval_every", "clients_per_round"]
    lines = ["| task | model | max_length | " + " | ".join(sized) + " |",
             "|---" * (3 + len(sized)) + "|"]
    for name, task_class in tasks().items():
        run = task_class.run_defaults
        lines.append(f"| `{name}` | `{task_class.default_model}` | {task_class.default_max_length} | "
                     + " | ".join(str(run[key]) for key in sized) + " |")
    return "\n".join(lines)


# Where a run goes on and what it reports to, not what it computes
RESUME_MAY_CHANGE = ("resume", "out", "verbose", "ray", "tracking")


def _saved_value(saved: dict, key: str):
    """The value of a command-line key (``a.b``; a preset group means its ``name``) in a config
    in ``RunConfig.to_dict``'s nested layout."""
    node = saved
    path = key + ".name" if key in preset_groups() and key != "dp" else key
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resumed_config(run_dir: Path, command_line: RunConfig, given: list[str]) -> RunConfig:
    """The config of the run in ``run_dir``; a key given on the command line (``given``) may
    differ from it only if it is one of ``RESUME_MAY_CHANGE``."""
    import yaml

    saved_file = run_dir / "config.yaml"
    if not (run_dir / "checkpoint.pt").is_file() or not saved_file.is_file():
        raise ConfigError(f"resume={run_dir} has no checkpoint.pt and config.yaml; give the "
                          "directory of a run that wrote a checkpoint")
    saved = yaml.safe_load(saved_file.read_text())
    new = command_line.to_dict()
    for key in given:
        if key.split(".")[0] in RESUME_MAY_CHANGE + ("hydra",):
            continue
        was, now = _saved_value(saved, key), _saved_value(new, key)
        if was != now:
            raise ConfigError(f"resume: {key}={now} differs from the run's {key}={was}; a resumed "
                              f"run keeps its config (drop {key}= or set it to {was})")
    check_checkpoint(run_dir)  # a damaged one would fail only in the server, after Ray started
    resumed = RunConfig.from_saved(saved)
    return dataclasses.replace(resumed, verbose=command_line.verbose, ray=command_line.ray,
                               tracking=command_line.tracking if "tracking" in given
                               else resumed.tracking)


def run_config_table() -> str:
    """pyproject.toml's ``[tool.flwr.app.config]`` entries: every generated key, "" meaning its
    default (``python -m fedlora.run.cli run-config``)."""
    from flwr.common.config import flatten_dict

    return "\n".join(f'{key} = ""' for key in flatten_dict(run_config_values(hydra_tree())))


if __name__ == "__main__":
    commands = {"keys": keys_markdown, "run-config": run_config_table}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        fail("usage: python -m fedlora.run.cli keys|run-config  (the key table of "
             "docs/configuration.md | pyproject.toml's [tool.flwr.app.config] entries)")
    print(commands[sys.argv[1]]())
