"""Development tooling, not the data path: the pipeline as local processes (``localrun``), a
local JetStream cluster (``jscluster``), the signal simulator (``simulate``) and ``bridge demo``
(``demo``). Production modules never import from here."""
