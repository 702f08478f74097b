"""kold.gateway: see README.md in this folder."""
