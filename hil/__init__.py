"""hil: the physical site in network namespaces, for tests that cross real links.

``kernel`` finds what this kernel can do; ``topology`` builds plant, gateway, WAN router and
clouds as namespaces joined by veth pairs, and breaks and mends their links; ``relay`` is the
userspace latency/jitter/loss relay (no netem here); ``site`` runs the product's processes on
it; ``scenarios`` are the failures, each with its exact accounting. ``python -m hil``.
"""
