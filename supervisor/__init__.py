"""The supervisor: the daemon's entry point (``durable serve``)."""
