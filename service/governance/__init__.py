"""Governance after deployment: monitoring clinicians' review outcomes, and recalling the summaries of
a model file or a prompt version."""
