"""The compute core: models, tensor data, training loop, attacks on arrays.

Imports torch and numpy only (attacks and hashing: numpy alone), so it runs on a GPU machine
without dvc, mlflow or Great Expectations installed. Nothing here reads files or config.
"""
