"""Edge telemetry bridge: SCADA brokers to multi-cloud ingest, nothing lost, nothing doubled."""

__version__ = "0.1.0"
