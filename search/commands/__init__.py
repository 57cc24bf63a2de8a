"""Command-line subcommands that need the search layer (search, compare, export, explain)."""
