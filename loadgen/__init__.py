"""kold.loadgen: see README.md in this folder."""
