"""``kvtier serve``: one process per node owning the shared DRAM pool and its slot table (docs/node.md).

``slots`` is the table (no bytes, no sockets); ``server`` is the process: the Unix socket, the pool's
memfd, one loop answering every client.  Engine processes reach it through ``kvtier.tiers.node``.
"""
