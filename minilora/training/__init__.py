"""Training and data: the built-in tasks, the planted-rank task, a run's folder,
and the trainer (schedule, clipping, evaluation, checkpoints, exact resume).
"""
