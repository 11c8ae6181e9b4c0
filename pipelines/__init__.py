"""attnflow's domain: configuration, events, data, validation, model, training, evaluation.

Nothing here imports Prefect or BentoML, and nothing happens at import time.
"""
