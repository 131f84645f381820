"""What both sides of the wire share: the wire schema (`_pb`), config, telemetry, the
exception tree, PKI, files, pacing, gRPC client settings, sockets and the HTTP endpoint."""
