"""The model: a Llama-family decoder as pure functions over a parameter pytree (``llama``), LoRA
adapters (``lora``), weight import/export for GGUF and Hugging Face safetensors (``weights``), the
tokenizer and chat template (``tokenizer``), the embedded default model's file (``files``) and the
loaded base model every role shares (``base_model``).

Layer 3: may import ``config``, ``roles``, ``runtime`` and ``parallel``.
"""
