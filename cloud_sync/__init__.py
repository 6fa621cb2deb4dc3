"""Both ends of the uplink: the gateway-side forwarder and the central aggregator."""
