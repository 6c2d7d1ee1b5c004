"""Experiments that probe the ideas behind large language models with small GPTs (see lab/common.py)."""
