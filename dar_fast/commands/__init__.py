"""CLI subcommands that are not tied to one subsystem."""
