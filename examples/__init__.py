"""Example objects, hosted by `durable serve`'s built-in defaults."""
