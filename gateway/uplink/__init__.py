"""The gateway's side of the uplink: the store-and-forward `Forwarder` and the `ModelFetcher`."""
