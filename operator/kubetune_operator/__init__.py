"""The kopf operator for TuningJobs (Kubernetes side). Filled by the operator issue."""
