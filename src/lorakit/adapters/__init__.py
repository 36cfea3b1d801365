"""Adapter files (the PEFT layout), composition, and the versioned registry shared by the CLI and the server."""
