"""galore_train: the bundled training application of galore_kernels.

Memory-lean fine-tuning of Hugging Face causal LMs with GaLore: 8-bit quantized loading, optimizer
routing, preflight checks, exact gradient accumulation and mid-epoch resume, and a JSON memory report.
Run it as ``galore-train --config FILE`` or ``python -m galore_train --config FILE``.
"""
