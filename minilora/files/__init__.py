"""Files: safetensors and JSON read and written by hand (no pickle, ever), model
checkpoints, adapter files and the built-in base.
"""
