"""The robustness suite uses the released-state fixtures of tests/conftest.py (``released``,
``payload``, ``marker``, ``digest``)."""
