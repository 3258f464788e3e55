"""The ground floor: the version, argument checks, the array backend (NumPy or CuPy)
and BLAS threads. Everything else stands on these; they know nothing of models.
"""
