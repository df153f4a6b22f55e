"""The prompt family: methods that add learned inputs (virtual tokens or KV prefixes) instead of
wrapping weights. ``common.py`` holds what they share."""
