"""``python -m mathmill`` runs the CLI."""

from mathmill.cli import main

main()
