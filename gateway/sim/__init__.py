"""Fleet simulator: food-line nodes publishing realistic telemetry over MQTT, with labelled fault injection."""

from gateway.sim.equipment import EQUIPMENT_TYPES
from gateway.sim.faults import FaultSpec, FaultSpecError, RandomFaults, SimError, TruthRecord, parse_faults
from gateway.sim.fleet import FleetOptions, FleetStats, fleet_things, run_fleet

__all__ = [
    "EQUIPMENT_TYPES",
    "FaultSpec",
    "FaultSpecError",
    "FleetOptions",
    "FleetStats",
    "RandomFaults",
    "SimError",
    "TruthRecord",
    "fleet_things",
    "parse_faults",
    "run_fleet",
]
