"""fedlora: federated fine-tuning of transformers with LoRA-family adapters, on Flower.

Entry points: ``python -m fedlora.simulate`` (simulation on Ray), ``fedlora.run.server.app`` and
``fedlora.clients.app.app`` (the Flower ServerApp and ClientApp), ``fedlora.strategies``.
"""

__version__ = "0.1.0"
