"""The gateway side of the wire: sources -> intake (codecs) -> spool -> uplink; `agent`
wires them into one service."""
