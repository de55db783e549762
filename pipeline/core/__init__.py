"""The compute core: models, tensor data, training loop, attacks on arrays, detectors on features.

Imports torch and numpy only (attacks and hashing: numpy alone), plus the standard-library
config types of ``pipeline.schema`` (the one definition of the hyper-parameters it takes), so it
runs on a GPU machine without dvc, mlflow or Great Expectations installed. Nothing here reads
files or config, and nothing here imports a stage module, the data layer or tracking.
"""
