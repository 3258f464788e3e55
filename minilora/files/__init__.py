"""Files: safetensors through the ``safetensors`` package and JSON (no pickle, ever),
model checkpoints, adapter files and the built-in base.
"""
