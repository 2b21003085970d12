"""The model side: the pretrained base with its adapters (``pretrained``), the LoRA / LoRA-SB
layers and their state keys (``adapters``), the embedded offline LLM (``embedded_llm``) and the
export of a run's adapter for peft (``export``).

Layer 3: may import ``fedlora.core``, ``fedlora.aggregation``, ``fedlora.privacy`` and
``fedlora.tasks`` (a task names the model class and its head).
"""
