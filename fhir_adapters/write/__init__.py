"""Writing to the EHR: a summary as an AI draft, and a clinician's verdict on it.

`draft` builds the one transaction that writes a summary (pure), `review` checks a verdict and
builds what it changes (pure), and `send` is the only module here that talks to the server.
"""
