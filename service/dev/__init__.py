"""Developer tools, kept out of the adapter package: a local FHIR server and a sandbox loader.

`devserver` starts and stops a throwaway local FHIR server (tests, the demo, benchmarks);
`sandbox` loads Synthea bundles into any FHIR sandbox (`chartbrief sandbox load`). The summary
path (fetch, normalize, write) never imports them.
"""
