"""The broker: routes calls from clients to the slot that owns each object (see DESIGN §1)."""
