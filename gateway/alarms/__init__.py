"""The alarm journal: who acknowledged, resolved or commented on an anomaly, and shelved conditions."""
