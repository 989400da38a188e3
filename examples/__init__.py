"""Example models and data built from datasets shipped inside packages (no downloads)."""
