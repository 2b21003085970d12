"""Server-side maths, pure and tested on its own: the aggregation rules of the LoRA methods
(``maths``: weighted means, the SVD re-factorisation, the LoRA-FAIR correction, the FedEx
residual, Fed-SB's init) and who takes part in a round and with what weight (``participation``:
client sampling, participation models, FedAU).

Layer 1: may import ``fedlora.core`` only. Tensors in, tensors out: no Flower, no model.
"""
