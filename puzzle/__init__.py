"""puzzle: turn a trained Hugging Face LLM into a faster, smaller, deployable derivative.

Puzzle NAS (blockwise local distillation + MIP), FFN Fusion and Minitron pruning, with outputs that load in
`transformers` (trust_remote_code) and serve in vLLM's native `DeciLMForCausalLM`. See the README and docs/.
"""

__version__ = "0.1.0"
