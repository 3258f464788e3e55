"""Worked solutions to the exercises of notebook 05 (merge and multiple adapters)."""

import json

import numpy as np

# safetensors dtype codes: every one little-endian ("<"); one byte has no order
DTYPES = {
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "I32": "<i4",
    "I64": "<i8",
    "U8": "u1",
    "BOOL": "?",
}


def merge_unmerge(W, A, B, s):
    """Keep W before merging: subtracting ΔW again would round."""
    saved = W.copy()
    W_merged = W + s * (B @ A)
    W_back = saved  # unmerge: write the saved copy back
    return W_merged, W_back


def cat_combination(As, Bs, scales, weights):
    A = np.concatenate(As, axis=0)
    B = np.concatenate([w * s * B_i for B_i, s, w in zip(Bs, scales, weights, strict=True)], axis=1)
    return A, B


def svd_combination(As, Bs, scales, weights, r):
    A_cat, B_cat = cat_combination(As, Bs, scales, weights)
    U, S, Vt = np.linalg.svd(B_cat @ A_cat, full_matrices=False)
    A = np.sqrt(S[:r])[:, None] * Vt[:r]
    B = U[:, :r] * np.sqrt(S[:r])
    error = np.sqrt((S[r:] ** 2).sum() / (S**2).sum())
    return A, B, float(error)


def safetensors_tensor(data, name):
    """The format by hand: length, JSON header, then raw little-endian bytes."""
    n = int.from_bytes(data[:8], "little")  # the header length
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    entry = header[name]
    begin, end = entry["data_offsets"]  # counted from the data section, at byte 8 + n
    raw = data[8 + n + begin : 8 + n + end]
    return np.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
