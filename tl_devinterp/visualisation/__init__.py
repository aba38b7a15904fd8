"""Pictures: matplotlib figures (PNG) and offline interactive HTML (circuitsvis)."""
