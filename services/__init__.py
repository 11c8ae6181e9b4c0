"""BentoML services: thin serving wrappers over `pipelines`."""
