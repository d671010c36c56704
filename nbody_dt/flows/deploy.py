"""Serve the train flow on a schedule from one long-lived process (`nbody-dt deploy`).

Every scheduled run continues the same run URL (mode 'auto': the first creates it, later ones
resume it from storage), so a failed or killed scheduled run is picked up by the next one (a
killed run's lock is taken over only when its process is gone from this host: break_lock 'stale').
"""

from __future__ import annotations

from nbody_dt.flows.training import train

DEPLOYMENT_NAME = "nbody-dt-serve"
"""Beside, not over, the work-pool deployment `nbody-dt-train` of prefect.yaml."""


def serve(run_url: str, config_path: str | None = None, overrides: list[str] | None = None,
          cron: str | None = None, interval: float | None = None, name: str = DEPLOYMENT_NAME) -> None:
    """Register the deployment with its schedule and execute its runs until interrupted."""
    train.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"run_url": run_url, "config_path": config_path, "overrides": overrides or [], "mode": "auto",
                    "break_lock": "stale"},
        description="Train (or continue) an nbody-dt run on a schedule",
        tags=["nbody-dt"],
        limit=1,  # scheduled runs continue one run URL: never two at once
    )
