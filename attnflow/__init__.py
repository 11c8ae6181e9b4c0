"""attnflow: the command line and the local stack around `pipelines`, `flows` and `services`."""

__version__ = "0.1.0"
