"""The backup worker: scheduled backup jobs of hosts' disks and VMs (docs/jobs.md)."""
