"""Worked solutions to the exercises of notebook 02 (alpha, rank and dropout)."""

import math


def inverted_dropout(x, keep, p):
    """Survivors are divided by 1 - p, so that E[y] = x."""
    return x * keep / (1.0 - p)


def dropout_backward(dy, keep, p):
    """The forward multiplies by a constant per unit; the backward by the same one."""
    return dy * keep / (1.0 - p)


def lora_scale(alpha, r, rslora):
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r
