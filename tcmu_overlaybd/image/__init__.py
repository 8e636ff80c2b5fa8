"""Image references, OCI layouts, registries, manifests: from a name to a list of layers."""
