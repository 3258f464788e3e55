"""Worked solutions to the exercises of notebook 03 (counting parameters and memory)."""

from minilora.core import params

SHAPES = {"fc": (1, 4), "proj": (4, 1)}  # (d_in, d_out) in units of d; q, k, v, o are (1, 1)


def lora_parameter_count(n_layer, d_model, r, targets):
    """r (d_in + d_out) per adapted matrix, over every block."""
    per_block = 0
    for t in targets:
        a, b = SHAPES.get(t, (1, 1))
        per_block += r * (a * d_model + b * d_model)
    return n_layer * per_block


def training_memory(config, r, targets, bytes_per_param):
    """weights + gradients + AdamW's state + activations, in bytes."""
    c = config
    base = params.count_architecture(
        c["vocab_size"], c["block_size"], c["n_layer"], c["n_head"], c["d_model"]
    )["total"]
    lora = 0 if r is None else lora_parameter_count(c["n_layer"], c["d_model"], r, targets)
    trainable = base if r is None else lora  # full fine-tuning trains everything
    weights = (base + lora) * bytes_per_param  # the adapters are stored too
    gradients = trainable * bytes_per_param
    optimizer = trainable * 3 * bytes_per_param  # m, v and AdamW's work array
    return (
        weights
        + gradients
        + optimizer
        + params.step_activation_bytes(c, r, targets, bytes_per_param)
    )
