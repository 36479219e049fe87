"""A SMART test EHR: an authorization server in front of a real FHIR server (test scaffolding)."""
