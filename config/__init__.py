"""Settings and logging set-up shared by the gateway and the workers."""
