"""`chartbrief eval`: how often the verifier is right (`claims`), and what summaries are worth (`run`)."""
