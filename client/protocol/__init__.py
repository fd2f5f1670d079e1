"""The wire protocol shared by client, broker and objectproc (sans I/O; never imports zmq)."""
