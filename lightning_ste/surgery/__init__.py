"""Model surgery: plan a conversion, apply it, revert it (ReLU call sites, weight parametrizations)."""
