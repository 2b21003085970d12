"""A node's own DP policy: what a run must promise before this node releases anything.

The server's settings travel in every message, and without a policy a node follows them: DP
or not, its epsilon and delta, secret or reproducible noise. A node that must protect its data
says what it accepts in its own config, which no run can change (``flower-supernode
--node-config 'dp-required=true dp-max-epsilon=8'``; ``python -m fedlora.deploy local
node_config="..."``):

  dp-required           true: the run must train this node with DP-SGD (``dp.epsilon`` set,
                        ``dp.mode=record``); a run without DP, or with client-level DP (where
                        the server sees the node's raw update), is refused. Default false.
  dp-max-epsilon        the largest epsilon the node spends over a run; a run asking for more
                        is refused. Implies ``dp-required`` (no DP spends an unbounded
                        epsilon). Default: no cap.
  dp-delta              the largest delta: a run whose ``delta_k = min(dp.delta, 1/n_k)`` is
                        larger is refused. Default: no cap.
  dp-secret-noise-only  true: refuse reproducible noise (seeded by what the server knows, so
                        the server can replay and remove it). Default: true when the node
                        requires DP (``dp-required`` or ``dp-max-epsilon``), else false.

A run at least as strict as the policy is followed as it is (a node never loosens a run's
settings; it plans its own noise multiplier from them, ``fedlora.clients.dp``). A run below the
policy gets, for every message, one error reply whose reason contains ``NODE_POLICY`` and names
the key, the policy's value and the run's, and nothing else: no label histogram, no number of
examples, no update. A node config with a bad value or an unknown ``dp-`` key refuses every
run the same way (a typo must not drop a policy silently).

Without any of these keys (simulation, where Flower sets only ``partition-id`` and
``num-partitions``) a node follows the server, as it always did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NODE_POLICY = "node policy"  # in the reason of every refusal: the server recognises it by this
POLICY_KEYS = ("dp-required", "dp-max-epsilon", "dp-delta", "dp-secret-noise-only")


class PolicyError(ValueError):
    """A node config value the policy cannot use; the message names the key and the value."""


@dataclass(frozen=True)
class NodePolicy:
    """What this node accepts (``from_node_config``); the defaults accept every run."""

    dp_required: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    secret_noise_only: bool | None = None  # None: as ``requires_dp``

    @classmethod
    def from_node_config(cls, node_config) -> "NodePolicy":
        """The policy in a node's config (``Context.node_config``); ``PolicyError`` for a bad
        value or an unknown ``dp-`` key."""
        unknown = sorted(key for key in node_config
                         if str(key).startswith("dp-") and key not in POLICY_KEYS)
        if unknown:
            raise PolicyError(f"node config key {unknown[0]} is unknown; the policy keys are "
                              f"{', '.join(POLICY_KEYS)}")
        return cls(dp_required=_flag(node_config, "dp-required", False),
                   max_epsilon=_positive(node_config, "dp-max-epsilon"),
                   max_delta=_positive(node_config, "dp-delta", below_one=True),
                   secret_noise_only=_flag(node_config, "dp-secret-noise-only", None))

    @property
    def requires_dp(self) -> bool:
        return self.dp_required or self.max_epsilon is not None

    @property
    def secret_only(self) -> bool:
        return self.requires_dp if self.secret_noise_only is None else self.secret_noise_only

    def refusal(self, config, num_examples: int) -> str | None:
        """Why this node refuses a run whose message config is ``config`` (None: it accepts);
        ``num_examples``: the node's n_k (its delta_k is ``min(dp.delta, 1/n_k)``)."""
        epsilon = float(config.get("dp-epsilon", 0.0))
        if epsilon <= 0:  # no DP-SGD on this node (no DP, or client-level DP on the server)
            if not self.requires_dp:
                return None
            key = ("dp-required=true" if self.dp_required
                   else f"dp-max-epsilon={self.max_epsilon:g}")
            return (f"{NODE_POLICY} {key} refuses a run without DP-SGD on this node "
                    "(dp.epsilon unset, or dp.mode=client); set dp.epsilon")
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            return (f"{NODE_POLICY} dp-max-epsilon={self.max_epsilon:g} refuses "
                    f"dp.epsilon={epsilon:g}; set dp.epsilon <= {self.max_epsilon:g}")
        delta = min(float(config["dp-delta"]), 1.0 / num_examples)
        if self.max_delta is not None and delta > self.max_delta:
            return (f"{NODE_POLICY} dp-delta={self.max_delta:g} refuses "
                    f"dp.delta={float(config['dp-delta']):g}; set dp.delta <= {self.max_delta:g}")
        noise = str(config.get("dp-noise", "secret"))
        if self.secret_only and noise != "secret":
            implied = "" if self.secret_noise_only is not None else " (implied by requiring DP)"
            return (f"{NODE_POLICY} dp-secret-noise-only=true{implied} refuses "
                    f"dp.reproducible_noise=true (noise the server can replay and remove); "
                    "drop dp.reproducible_noise")
        return None


def refusal(node_config, config, num_examples: int) -> str | None:
    """Why the node with ``node_config`` refuses the run of a message with ``config``, or
    None; a node config the policy cannot read refuses every run."""
    try:
        policy = NodePolicy.from_node_config(node_config)
    except PolicyError as error:
        return f"{NODE_POLICY}: {error}; fix the SuperNode's --node-config"
    return policy.refusal(config, num_examples)


def _flag(node_config, key: str, default):
    value = node_config.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PolicyError(f"node config {key}={value!r} must be true or false")


def _positive(node_config, key: str, below_one: bool = False) -> float | None:
    value = node_config.get(key)
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not (0 < number < (1 if below_one else math.inf)):
        bound = "a number in (0, 1)" if below_one else "a positive finite number"
        raise PolicyError(f"node config {key}={value!r} must be {bound}")
    return number
