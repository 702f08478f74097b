"""kold.controller: see README.md in this folder."""
