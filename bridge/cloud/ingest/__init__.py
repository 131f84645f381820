"""The ingest tier: authenticate the site, dedupe, commit, and only then acknowledge."""
