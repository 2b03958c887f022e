"""The host: owns disks, serves them over NBD and an HTTP control API."""
