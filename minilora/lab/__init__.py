"""The lab: experiments and the figures drawn from them, sweeps, benchmarks, the
model-wide gradient-check report and the PyTorch reference model.
"""
