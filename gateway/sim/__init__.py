"""Fleet simulator: realistic food-line telemetry over MQTT, with labelled fault injection."""

from gateway.sim.faults import FaultSpec, RandomFaults, parse_faults
from gateway.sim.fleet import FleetOptions, FleetStats, fleet_things, run_fleet

__all__ = ["FaultSpec", "FleetOptions", "FleetStats", "RandomFaults", "fleet_things", "parse_faults", "run_fleet"]
