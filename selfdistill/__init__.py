"""selfdistill: prune an LLM's redundant layers, then recover it on its parent's own rewrites.

Method: Thangarasa et al., *Self-Data Distillation for Recovering Quality in Pruned LLMs* (arXiv 2410.09982).
"""

__version__ = "0.1.0"
