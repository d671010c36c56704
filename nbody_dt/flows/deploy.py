"""Serve the train flow on a schedule from one long-lived process (`nbody-dt deploy`).

Every scheduled run continues the same run URL (mode 'auto': the first creates it, later ones
resume it from storage), so a failed or killed scheduled run is picked up by the next one.
"""

from __future__ import annotations

from nbody_dt.flows.training import train

DEPLOYMENT_NAME = "nbody-dt-train"


def serve(run_url: str, config_path: str | None = None, overrides: list[str] | None = None,
          cron: str | None = None, interval: float | None = None, name: str = DEPLOYMENT_NAME) -> None:
    """Register the deployment with its schedule and execute its runs until interrupted."""
    train.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"run_url": run_url, "config_path": config_path, "overrides": overrides or [], "mode": "auto"},
        description="Train (or continue) an nbody-dt run on a schedule",
        tags=["nbody-dt"],
    )
