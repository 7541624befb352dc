"""Pure metric functions: (model or tensors, config) -> result dataclass. No printing, no files."""
