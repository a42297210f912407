"""Context parallelism: layout bookkeeping, summary exchange, collectives with autograd, conv halo."""
