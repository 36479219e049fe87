"""HTTP routes, one module per audience: health (operators), launch and review (clinicians), api
(other systems)."""
