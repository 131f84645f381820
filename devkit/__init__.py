"""The development harness, outside the shipped package (neither the wheel nor the .deb holds
it): the pipeline as local processes (``localrun``), a local JetStream cluster
(``jscluster``), the signal simulator (``simulate``) and the demo (``demo``), with their
commands in ``python -m devkit``. Nothing in ``bridge`` imports from here."""
