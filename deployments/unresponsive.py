"""Mark flow runs whose process died as Crashed instead of leaving them Running for ever.

A flow process that is SIGKILLed (the OOM killer, a lost VM, `kill -9`) never reports its end:
the run stays Running in the UI and, with the deployment's concurrency limit of 1, holds the
only slot, so every triggered run after it waits in the queue. Every flow run sends a
`prefect.flow-run.heartbeat` event every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (180 by
default since Prefect 3.6.22); this automation (Prefect's documented recipe for self-hosted
servers, "Detect zombie flows") crashes a run when `missed` heartbeats in a row do not arrive.
It covers every flow run on the server, as Prefect Cloud's managed equivalent does.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.settings import get_current_settings

AUTOMATION_NAME = "audio-pipeline: crash flow runs that stopped sending heartbeats"


def unresponsive_runs_automation(heartbeat_s: int | None = None, missed: int = 3) -> Automation:
    """After each heartbeat of a run, expect another event of that run (heartbeat or any state
    change) within `missed` heartbeat periods; otherwise set the run to Crashed."""
    heartbeat_s = heartbeat_s or get_current_settings().flows.heartbeat_frequency or 180
    return Automation(
        name=AUTOMATION_NAME,
        description=f"No heartbeat for {missed} x {heartbeat_s} s: the flow process is gone (deployments/unresponsive.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=missed * heartbeat_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {missed * heartbeat_s} s: the flow process died (killed, OOM, lost host)",
        )],
    )


def ensure_unresponsive_runs_automation(heartbeat_s: int | None = None, missed: int = 3) -> UUID:
    """Create the automation, or bring the existing one (same name) up to date; returns its id."""
    wanted = unresponsive_runs_automation(heartbeat_s, missed)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # not found
        return wanted.create().id
    wanted.id = existing.id
    wanted.update()
    return existing.id
