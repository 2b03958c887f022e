"""The `blocktrail` command."""
