"""Process life: the server, services and periodic tasks, the shared context, privileges."""
