"""Worked solution of notebook 09's exercise (To GPT-2 and PEFT).

Check it with ``minilora exercises check split_c_attn --file FILE`` (this file).
"""


def split_c_attn(W, b):
    """GPT-2's fused Conv1D c_attn, W (d, 3d) and b (3d,) = [q | k | v] -> minilora's
    q, k, v weights (d_out, d_in) = (d, d) and biases (d,)."""
    d = W.shape[0]
    Wq = W[:, 0:d].T  # column block 0 is q as Conv1D's (d_in, d_out): transpose it
    Wk = W[:, d : 2 * d].T
    Wv = W[:, 2 * d : 3 * d].T
    bq, bk, bv = b[0:d], b[d : 2 * d], b[2 * d : 3 * d]
    return Wq, Wk, Wv, bq, bk, bv
