"""Layer 1, the pure domain: commands, the protocol state machine, specs, policies, rendering,
prompts, the fix loops' and reviews' decisions. No I/O; imports only bot.core."""
