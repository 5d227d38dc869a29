"""What runs once per node: the usage engine, start-up reconciliation, the FUSE view's supervisor."""
