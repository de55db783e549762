"""Team-scale tests (issue 14): a shared MLflow server on PostgreSQL with an S3 artifact store,
a DVC remote on the same S3 server, the promotion lock, DDP training. A package, so that its
conftest does not shadow tests/conftest.py (``from conftest import make_repo_copy``)."""
