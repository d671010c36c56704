"""Prefect flows: the epoch loop with resume logic, and deployments."""
