"""OEE at the gateway: machine states, counts, the shift calendar, state events with reasons, and OEE."""
