"""Job definitions: what a user asks for (jobs, triggers, the cron dialect, job files)."""
