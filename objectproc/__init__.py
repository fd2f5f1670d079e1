"""The object process: hosts the objects of one slot (see DESIGN §1)."""
