"""Spool -> ingest: mTLS gRPC transport, endpoint pool (health, failover), batch sender."""
