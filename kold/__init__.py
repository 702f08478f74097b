"""kold: serverless LLM inference with pipelined snapshot restore and predictive pre-warming."""

__version__ = "0.1.0"
