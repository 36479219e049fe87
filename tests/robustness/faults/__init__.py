"""Fault injection between chartbrief and a real FHIR server: a proxy and the tests run through it."""
