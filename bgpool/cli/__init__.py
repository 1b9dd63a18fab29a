"""The `bgpool` command: argument parsing and display over the public API."""
