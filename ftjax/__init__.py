"""ftjax: Byzantine-robust synchronous training in JAX.

A functional JAX/Flax reimplementation of "Fault Tolerant ML: Efficient
Meta-Aggregation and Synchronous Training" (Dahan & Levy, ICML 2024).
"""

__version__ = "0.1.0"
