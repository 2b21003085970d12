"""Fed-SB (arXiv 2502.15436): federated LoRA-SB (arXiv 2411.19557), only R (r x r) trained.

    adapter:  W0 + B R A with B (m x r), A (r x n) frozen and orthonormal, R trainable
    round 0:  init clients upload G_k = sum of base-weight gradients over their examples;
              server: G = sum_k G_k,  U S V^T = rank-r SVD of -eta sign(G),
              B = U, R0 = diag(S), A = V^T   (LoRA-SB init, scale s = 1)
    round t:  clients train R (and the head) from the global R
              server: R <- E_w[R_k],  head <- E_w[head_k]
    exact:    B E_w[R_k] A = E_w[B R_k A]  (B and A are shared), so this is FedAvg of updates.

fedlora's decision (ALGORITHMS.md): the official code estimates G on the pooled training set,
which a federated system cannot; here it is a one-shot sum over the round-0 clients, whose
upload (m n per matrix per client) and the first B/A download to each client are counted.
"""

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedlora.model.adapters import factor_key, layer_names
from fedlora.aggregation.maths import lora_sb_init, single_threaded
from fedlora.clients.dp import ClientPrivacy, private_gradient_sum
from fedlora.clients.hooks import SETUP_MESSAGE_TYPE, ClientHooks
from fedlora.clients.train import base_gradient_sum
from fedlora.core.registry import register_strategy
from fedlora.core.settings import POSITIVE, setting
from fedlora.strategies.base import FederatedLoRA

log = logging.getLogger("fedlora")


@dataclass(frozen=True)
class FedSBSettings:
    """Fed-SB's federated LoRA-SB initialisation (``fedsb.*``): clients sampled in a round 0
    upload their summed base-weight gradients (m x n per adapted matrix, once, counted)."""

    init_samples: int = setting(256, "examples whose summed gradient sets B, R, A (the official "
                                "code's num_samples), split evenly over the round-0 clients",
                                check=POSITIVE)
    init_lr: float = setting(1e-3, "eta of the first-step surrogate -eta sign(G)", check=POSITIVE)


class FedSB(FederatedLoRA):
    latent = True
    exact = True
    trained_parts = ("R", "head")
    one_time_parts_down = frozenset({"A", "B"})
    # B and A never change after the init: kept, they travel once to each client (holdings)
    kept_parts = frozenset({"A", "B"})
    defaults = {"rank": 32, "alpha_per_rank": 1.0, "lr": 3e-2}

    @staticmethod
    def params_up(m: int, n: int, rank: int) -> int:
        return rank * rank

    @staticmethod
    def params_down(m: int, n: int, rank: int) -> int:
        return rank * rank

    @classmethod
    def setup_examples_per_client(cls, settings: FedSBSettings, clients_per_round: int) -> int:
        """Each round-0 client's share of ``init_samples`` (its DP release is planned for it)."""
        return -(-settings.init_samples // clients_per_round)

    def export_factors(self, state):
        """Plain LoRA with ``B' = B R`` and ``A' = A``: ``s B' A' = s B R A``, the same update."""
        return {layer: (B @ state[factor_key(layer, "R")], A)
                for layer, (B, A) in super().export_factors(state).items()}

    def initialize(self, grid, arrays, exchange):
        """Round 0: the federated LoRA-SB initialisation from the clients' summed gradients."""
        state = arrays.to_torch_state_dict()
        head = {k: v for k, v in state.items() if self.part(k) == "head"}
        nodes = self.sample(0)
        share = -(-self.settings.init_samples // max(1, len(nodes)))  # examples per init client
        messages = [Message(content=RecordDict({
                        "arrays": ArrayRecord(head),
                        "config": ConfigRecord({**exchange.client_config, "server-round": 0,
                                                "init-samples": share})}),
                            message_type=SETUP_MESSAGE_TYPE, dst_node_id=node) for node in nodes]
        # G_k: one m x n gradient per adapted layer, m and n those of its B (m x r), A (r x n)
        expected = {f"{layer}.base.weight": ((state[factor_key(layer, "B")].shape[0],
                                              state[factor_key(layer, "A")].shape[1]), None)
                    for layer in layer_names(state)}
        replies = self.valid_setup_replies(exchange(0, messages), expected)
        if not replies:
            raise RuntimeError("Fed-SB initialisation failed: no init client replied validly")
        grads = self.private_setup([r.content["arrays"].to_torch_state_dict() for r in replies])
        with single_threaded():
            for grad_key in expected:  # '<layer>.base.weight', every one in every reply
                layer = grad_key[: -len(".base.weight")]
                grad_sum = torch.stack([g[grad_key].to(torch.float64) for g in grads]).sum(0)
                B, R, A = lora_sb_init(grad_sum, self.rank, self.settings.init_lr)
                state[f"{layer}.lora_B.weight"] = B.float()
                state[f"{layer}.lora_R.weight"] = R.float()
                state[f"{layer}.lora_A.weight"] = A.float()
        log.info("Fed-SB init from %d clients' gradients over %d examples", len(replies),
                 sum(int(r.content["metrics"]["num-examples"]) for r in replies))
        return ArrayRecord(state)


class FedSBClient(ClientHooks):
    """A Fed-SB client's set-up step: its round-0 gradient for the LoRA-SB initialisation."""

    def setup(self, node, message, context):
        """``G_k``: the summed gradients of the adapted base weights over ``init-samples`` of
        this node's examples (a uniform sample; under DP a Poisson sample at rate
        ``init-samples / n_k`` and one clipped, noised release charged to the accountant, once
        per run and only within the node's budget: else ``ReleaseRefused``)."""
        bundle = node.bundle
        bundle.set_base_delta(None)  # the pretrained W0, whatever a previous client left
        bundle.load(message.content["arrays"].to_torch_state_dict())  # the global head
        layers = dict(bundle.model.named_modules())
        with torch.no_grad():
            for name in bundle.adapted:  # R = 0: the adapters add nothing, so W0's gradient is
                layers[name].lora_R.weight.zero_()  # that of the plain pretrained model
        weights = {f"{name}.base.weight": layers[name].base.weight for name in bundle.adapted}
        share = int(node.config["init-samples"])
        privacy = ClientPrivacy.for_node(node.config, context.state, len(node.indices))
        if privacy is None:
            chosen = node.rng.sample(list(node.indices), min(share, len(node.indices)))
            grads = base_gradient_sum(bundle.model, weights,
                                      node.batches.epoch(chosen, int(node.config["batch-size"])),
                                      node.device, loss=node.task.loss)
            return grads, {"num-examples": len(chosen)}
        rate = min(1.0, share / len(node.indices))
        privacy.check_setup_release(rate)  # before the data is touched
        sampler = privacy.rng("init-poisson", node, context.state)
        chosen = [i for i in node.indices if sampler.random() < rate]
        grads = private_gradient_sum(bundle.model, weights, node.batches, chosen, privacy.clip,
                                     privacy.noise_multiplier,
                                     privacy.rng("init-noise", node, context.state),
                                     node.device, loss=node.task.loss)
        privacy.spend(1, context.state, "init", int(node.config.get("server-round", 0)), rate=rate)
        # The Poisson sample's size is private: report the expected one, rate * n_k.
        return grads, {**privacy.metrics(), "num-examples": min(share, len(node.indices))}


register_strategy("fedsb", FedSB, FedSBSettings, client=FedSBClient)
