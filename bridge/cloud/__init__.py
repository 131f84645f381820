"""The cloud side of the wire: ingest (authenticate, admit, validate) -> store (dedupe,
commit) -> consume (merge the clouds)."""
