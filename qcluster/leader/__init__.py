"""The leader: election, the scheduler pass, dispatch, recovery, migration, the control API."""
