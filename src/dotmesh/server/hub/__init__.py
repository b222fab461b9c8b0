"""The hub: accounts, namespaces and collaborators over a metadata database and a blob store."""
