"""What a method's clients do beyond the generic local training: its client hooks.

The ClientApp (``fedlora.clients.app``) is the same for every method: it loads the adapter
state a message names, trains the parts it names and replies with them. A method whose clients
need more subclasses ``ClientHooks`` in its own file in ``strategies/`` and registers it
(``register_strategy(..., client=MyClient)``); the app looks the class up by the ``strategy``
key of every message's config and calls it at these points, in this order:

  setup(node, message, context)             a ``train.setup`` message (sent by the method's
                                            server, e.g. before round 1): the reply's
                                            ``(arrays, metrics)``. Default: an error.
  restore(node, context, restore)           a ``restore`` record (what the node lost in a
                                            server restart): put the method's own node state
                                            back into ``Context.state``; return the rest (the
                                            kept parts the app restores). Default: all of it.
  before_training(node, context, received)  before every ``train`` message's local steps:
                                            take the method's own tensors out of
                                            ``received``, set the model's base delta
                                            (``bundle.set_base_delta``); return the rest.
                                            Default: the pretrained W0, ``received`` as is.
  training_loss(node, loss)                 the loss ``(model, batch, reduction)`` the local
                                            steps minimise. Default: the task's ``loss``.
  after_training(node, context, metrics)    after the local steps: the reply's metrics (e.g.
                                            ``next-rank``, the rank the client trains at from
                                            its next round). Default: ``metrics`` as they are.

``node`` is the app's ``ClientSetup`` for the message: its ``config``, ``bundle`` (the shared
cached model), ``batches``, ``indices`` (its examples), ``rng``, ``seed`` and ``device``.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message

SETUP_MESSAGE_TYPE = "train.setup"  # the one-time set-up message a server may send first


class ClientHooks:
    """The generic client: no method-specific step (each hook's default, see the module)."""

    def setup(self, node: ClientSetup, message: Message, context: Context
              ) -> tuple[dict[str, torch.Tensor], dict]:
        """The arrays and metrics a ``train.setup`` reply carries (``num-examples`` in the
        metrics takes the place of the node's number of examples, e.g. for a sample)."""
        raise RuntimeError(f"strategy '{node.config['strategy']}' has no set-up step, but the "
                           f"node got a '{SETUP_MESSAGE_TYPE}' message")

    def restore(self, node: ClientSetup, context: Context, restore: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """The restore record's tensors the app restores as kept parts, once the method's own
        node state is taken out of it and back into ``context.state``."""
        return restore

    def before_training(self, node: ClientSetup, context: Context,
                        received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter and head tensors to load, once the method's own are taken out of
        ``received``; sets the base delta the node trains on."""
        node.bundle.set_base_delta(None)  # the pretrained W0, whatever a previous client left
        return received

    def training_loss(self, node: ClientSetup, loss):
        """The loss ``(model, batch, reduction) -> tensor`` of the local steps (the task's
        ``loss`` by default)."""
        return loss

    def after_training(self, node: ClientSetup, context: Context, metrics: dict) -> dict:
        """The metrics the reply carries, once the local steps are done."""
        return metrics
