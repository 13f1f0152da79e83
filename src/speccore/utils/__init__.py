"""Plain utilities every layer may use: errors, atomic file writes, the cache and its keys,
progress bars and interrupt handling. Nothing here imports another part of speccore."""
