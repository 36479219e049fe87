"""CDS Hooks 2.0: chartbrief's `patient-view` service (discovery, request checks, cards, JWTs)."""
