"""Joining a Ray cluster (or starting a local one): shared by `grid submit` and `data prepare`."""

from __future__ import annotations

import os
import socket

import ray

from sparsity_scaling.errors import SettingError


def connect_ray(address: str | None) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start a local instance."""
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if not address or address == "local":
        # A single-machine instance: keep Ray on the loopback interface (Ray's switch for
        # laptop clusters), so the embedded default opens nothing to the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": _without_state_api_warnings})
        return
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=5).close()
        except (OSError, ValueError):
            raise SettingError("address", address, "no Ray cluster reachable there") from None
    try:
        ray.init(address=address, include_dashboard=False)
    except (ConnectionError, RuntimeError) as error:
        raise SettingError("address", address, f"cannot join the Ray cluster ({str(error).splitlines()[0]})") from None


def _without_state_api_warnings() -> None:
    """In every worker of the local instance: Ray Train's placement-group cleaner asks the
    State API (a dashboard service the embedded default does not start) every few seconds
    and warns each time it cannot; those warnings would bury the training progress."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
