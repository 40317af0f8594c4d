"""Free what a stopped multi-worker trial left behind, from the driver, at times the harness chooses.

Ray Train creates a trial's worker placement group from its controller actor. When Tune stops a trial (ASHA,
a failure, Ctrl-C) it kills the trial's trainable actor, the controller dies with it, but a placement group
outlives a non-detached creator: Ray ties it to the job. Ray Train relies on a detached background actor that
watches the controller through the dashboard's state API to remove it; when that actor is late or the state
API is not served, the CPUs stay reserved and the next trial waits forever (measured on 2 CPUs). The driver
therefore removes, itself, every placement group of its own job whose creator actor is dead.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_LIVE_STATES = (0, 1, 2, 4)    # PENDING, PREPARED, CREATED, RESCHEDULING (gcs_pb2.PlacementGroupTableData)


def orphaned_placement_groups() -> list[str]:
    """Hex ids of this job's placement groups that are still held although the actor that created them is dead.

    Reads the GCS placement-group table directly (the same source as `ray.util.placement_group_table`, which
    does not expose the creator's liveness); needs no dashboard. Empty if that table cannot be read.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    try:
        job = ray.get_runtime_context().get_job_id()
        table = state._connect_and_get_accessor().get_placement_group_table()
    except Exception as exc:  # noqa: BLE001 -- a private Ray API: never let it break a run
        log.debug("placement group table unavailable: %s", exc)
        return []
    driver = ray.ActorID.nil().binary()     # a group created by a driver (Tune's own) has no creator actor
    orphans = []
    for raw in table:
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.state in _LIVE_STATES and pg.creator_actor_dead and not pg.is_detached
                and pg.creator_actor_id not in (b"", driver) and pg.creator_job_id.hex() == job):
            orphans.append(pg.placement_group_id.hex())
    return orphans


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups `orphaned_placement_groups` finds; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for pg_id in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
        except Exception as exc:  # noqa: BLE001 -- removed concurrently by Ray Train's own cleaner
            log.debug("could not remove placement group %s: %s", pg_id, exc)
    return removed


class PeriodicReaper:
    """Calls remove_orphaned_placement_groups at most every `interval_s` seconds (from a Tune callback's
    on_step_end, which runs many times a second)."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self.removed = 0

    def poll(self) -> None:
        import time

        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s
            self.removed += remove_orphaned_placement_groups()
