"""Bulk Data `$export`: `manifest` is the pure part (parameters, polling waits, the manifest,
NDJSON lines), `export` the IO (kick-off, polls, streamed files, clean-up) over the FHIR client.
"""
