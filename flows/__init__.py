"""Prefect flows: thin orchestration over the stages in `pipelines` and `dvc.yaml`."""
