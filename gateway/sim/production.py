"""What a machine's PLC reports about production: its state, good and rejected unit counters, the
recipe — with microstops, breakdowns, starved spells, changeovers between recipes and scrap.

Published as the `production` feature of every simulated node (`state`, `good_count`,
`reject_count`, `recipe`). The counters are 16-bit PLC words: they roll over at 65,536, and start
at a random point so a demo sees rollovers. `ProductionTruth` keeps what really happened (seconds
per state, units made), to score what the gateway's OEE makes of the readings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from gateway.sim.equipment import RECIPES

COUNTER_MODULUS = 65536
# Seconds per unit at rated speed, per equipment type (a tray through an oven, a mixer's batch ...).
IDEAL_CYCLE_S = {"oven": 1.0, "mixer": 30.0, "conveyor": 0.5, "proofer": 2.0, "cooler": 1.0}
SPEED = (0.86, 0.96)  # running, a machine makes this share of its rated rate
SCRAP = 0.02  # rejected share while running steadily ...
STARTUP_SCRAP = 0.08  # ... and in the first STARTUP_S after a changeover
STARTUP_S = 600.0
# (state, mean seconds between starts while running, (shortest, longest) duration)
STOPS = (("down", 900.0, (10.0, 60.0)),  # microstops: a jam cleared at once
         ("down", 4 * 3600.0, (180.0, 600.0)),  # breakdowns
         ("idle", 3600.0, (60.0, 240.0)))  # starved or blocked
RECIPE_EVERY_S = 2 * 3600.0  # a new recipe this often (mean), after a changeover of ...
CHANGEOVER_S = (420.0, 780.0)


@dataclass
class ProductionTruth:
    """What the machine really did: seconds per state and units, since the run began."""

    seconds: dict[str, float] = field(default_factory=dict)
    good: int = 0
    rejected: int = 0
    stops: int = 0


class ProductionModel:
    """A machine's production state machine, stepped by simulated time (see the module docstring)."""

    def __init__(self, equipment_type: str, rng: random.Random) -> None:
        self.rng = rng
        self.ideal_cycle_s = IDEAL_CYCLE_S.get(equipment_type, 1.0)
        self.state = "running"
        self.until = 0.0  # a stop or changeover lasts until this elapsed time
        self.recipe = rng.choice(RECIPES)
        self.next_recipe_at = rng.expovariate(1.0 / RECIPE_EVERY_S)
        self.startup_until = 0.0
        self.speed = rng.uniform(*SPEED)
        self._made = 0.0  # fractional units toward the next one
        self.good_count = rng.randrange(COUNTER_MODULUS)
        self.reject_count = rng.randrange(COUNTER_MODULUS // 16)
        self.truth = ProductionTruth()

    def step(self, elapsed_s: float, dt_s: float) -> dict[str, float | str]:
        """Advance `dt_s` simulated seconds ending at `elapsed_s`; the PLC's values now."""
        t = self.truth
        t.seconds[self.state] = t.seconds.get(self.state, 0.0) + dt_s
        if self.state == "running":
            self._produce(elapsed_s, dt_s)
            self._maybe_stop(elapsed_s, dt_s)
        elif elapsed_s >= self.until:
            if self.state == "changeover":
                self.startup_until = elapsed_s + STARTUP_S
            self.state = "running"
            self.speed = self.rng.uniform(*SPEED)
        return {"state": self.state, "good_count": self.good_count, "reject_count": self.reject_count,
                "recipe": self.recipe}

    def _produce(self, elapsed_s: float, dt_s: float) -> None:
        self._made += dt_s / self.ideal_cycle_s * self.speed
        units = int(self._made)
        self._made -= units
        scrap = STARTUP_SCRAP if elapsed_s < self.startup_until else SCRAP
        rejected = sum(1 for _ in range(units) if self.rng.random() < scrap)
        self.good_count = (self.good_count + units - rejected) % COUNTER_MODULUS
        self.reject_count = (self.reject_count + rejected) % COUNTER_MODULUS
        self.truth.good += units - rejected
        self.truth.rejected += rejected

    def _maybe_stop(self, elapsed_s: float, dt_s: float) -> None:
        rng = self.rng
        if elapsed_s >= self.next_recipe_at:
            self.recipe = rng.choice([r for r in RECIPES if r != self.recipe])
            self.next_recipe_at = elapsed_s + rng.expovariate(1.0 / RECIPE_EVERY_S) + CHANGEOVER_S[1]
            self._stop("changeover", elapsed_s, CHANGEOVER_S)
            return
        for state, every_s, lengths in STOPS:
            if rng.random() < dt_s / every_s:
                self._stop(state, elapsed_s, lengths)
                return

    def _stop(self, state: str, elapsed_s: float, lengths: tuple[float, float]) -> None:
        self.state = state
        self.until = elapsed_s + self.rng.uniform(*lengths)
        self.truth.stops += 1


def oee_rules(types: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """`oee.types` that read what this simulator publishes: the PLC state tag, the counters, the recipe."""
    return {t: {"state_property": "production.state", "good_counter": "production.good_count",
                "reject_counter": "production.reject_count", "counter_modulus": float(COUNTER_MODULUS),
                "recipe_property": "production.recipe", "ideal_cycle_s": IDEAL_CYCLE_S.get(t, 1.0)}
            for t in types}


# Three eight-hour shifts a day with a half-hour break each: a bakery working around the clock.
DEMO_SHIFTS = (
    {"name": "early", "start": "06:00", "end": "14:00", "breaks": [{"start": "10:00", "end": "10:30"}]},
    {"name": "late", "start": "14:00", "end": "22:00", "breaks": [{"start": "18:00", "end": "18:30"}]},
    {"name": "night", "start": "22:00", "end": "06:00", "breaks": [{"start": "02:00", "end": "02:30"}]},
)
