"""The core a learner reads, in this order: ``layers`` (forward/backward pairs),
``lora`` (the LoRA math), ``model`` (the GPT), ``adapters`` (LoRA on a model),
``optim`` (SGD, AdamW), ``gradcheck`` (finite differences), ``params`` (counting
parameters and memory), and ``tokenizer`` (characters to ids).
"""
